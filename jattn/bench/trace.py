"""Mooncake-format traces: requests, scaling, synthetic tokens, conversations.

A trace has one JSON object a line: `timestamp` (ms), `input_length`, `output_length`
(tokens) and `hash_ids`, one id per 512-token prefix block: equal ids mean an identical
prefix. Token ids are drawn from a generator seeded by the hash id, so equal blocks give
equal tokens. `scale` shrinks every length and the block size by the same factor. A
request continues the conversation of the earlier requests that begin with the same
block, as its next turn.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

TRACE_BLOCK_TOKENS = 512


@dataclass(frozen=True)
class TraceRequest:
    """One request: arrival `timestamp_s`, `input_length` and `output_length` in tokens,
    `hash_ids` of its prefix blocks of `block_tokens` tokens each."""

    timestamp_s: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]
    block_tokens: int = TRACE_BLOCK_TOKENS


def load_trace(path: str, *, scale: float = 1.0, limit: int | None = None
               ) -> list[TraceRequest]:
    """The first `limit` requests of a trace, lengths and block size times `scale`."""
    if not 0 < scale <= 1:
        raise ValueError(f"scale must be in (0, 1], got {scale}")
    block = max(1, round(TRACE_BLOCK_TOKENS * scale))
    requests = []
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            if limit is not None and len(requests) >= limit:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                hash_ids = tuple(int(h) for h in row["hash_ids"])
                input_length = max(1, math.ceil(int(row["input_length"]) * scale))
                requests.append(TraceRequest(
                    float(row["timestamp"]) / 1000, min(input_length, len(hash_ids) * block),
                    max(1, math.ceil(int(row["output_length"]) * scale)), hash_ids, block))
            except (ValueError, KeyError, TypeError) as error:
                raise ValueError(f"{path}:{number}: not a Mooncake trace line ({error})") from None
    return requests


def block_token_ids(hash_id: int, count: int, *, vocab_size: int, reserved: int = 3
                    ) -> np.ndarray:
    """The `count` token ids of a block, a function of its hash id only (ids below
    `reserved` — special tokens — are never drawn)."""
    return np.random.default_rng(hash_id).integers(reserved, vocab_size, size=count,
                                                   dtype=np.int32)


def prompt_token_ids(request: TraceRequest, *, vocab_size: int, first_block: int = 0
                     ) -> list[int]:
    """The request's prompt from block `first_block` on (the last block is partial)."""
    ids = []
    for index in range(first_block, len(request.hash_ids)):
        count = min(request.block_tokens, request.input_length - index * request.block_tokens)
        if count <= 0:
            break
        ids.extend(block_token_ids(request.hash_ids[index], count,
                                   vocab_size=vocab_size).tolist())
    return ids


@dataclass(frozen=True)
class Turn:
    """A request as a turn of conversation `session`: `shared_blocks` prefix blocks it
    has in common with the conversation's previous turn (0 for a first turn)."""

    request: TraceRequest
    session: str
    shared_blocks: int


def conversations(requests: list[TraceRequest]) -> list[Turn]:
    """Each request as a turn of the conversation named by its first block."""
    last: dict[int, TraceRequest] = {}
    turns = []
    for request in requests:
        root = request.hash_ids[0] if request.hash_ids else -1
        previous = last.get(root)
        shared = 0
        if previous is not None:
            for mine, theirs in zip(request.hash_ids, previous.hash_ids):
                if mine != theirs:
                    break
                shared += 1
        turns.append(Turn(request, f"trace-{root}", shared))
        last[root] = request
    return turns


def reusable_tokens(requests: list[TraceRequest]) -> int:
    """Prompt tokens whose block already appeared, as a prefix, in an earlier request:
    the most any prefix cache could reuse on this trace."""
    seen: set[int] = set()
    total = 0
    for request in requests:
        for index, hash_id in enumerate(request.hash_ids):
            if hash_id not in seen:
                break
            total += min(request.block_tokens,
                         max(request.input_length - index * request.block_tokens, 0))
        seen.update(request.hash_ids)
    return total

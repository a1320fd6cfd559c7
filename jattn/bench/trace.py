"""Mooncake-format traces: requests, scaling, synthetic tokens, the prefix reuse a trace
allows, and a generator of shared-system-prompt traces.

A trace has one JSON object a line: `timestamp` (ms), `input_length`, `output_length`
(tokens) and `hash_ids`, one id per 512-token block of the prompt (the last one may be
partial): equal ids at the same position, after equal ids, mean an identical prefix.
Token ids are drawn from a generator seeded by the hash id, so equal blocks give equal
tokens. `scale` shrinks every length and the block size by the same factor.

    python -m jattn.bench.trace make-shared-prefix OUT.jsonl [--conversations 64] ...

writes a trace of conversations that all open with one system prompt
(`make_shared_prefix_trace`).
"""

from __future__ import annotations

import argparse
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
    `reserved` — special tokens — are never drawn). Fewer tokens are a prefix of more."""
    return np.random.default_rng(hash_id).integers(reserved, vocab_size, size=count,
                                                   dtype=np.int32)


def _block_counts(request: TraceRequest):
    """(hash id, prompt tokens in that block) of each block the prompt reaches."""
    for index, hash_id in enumerate(request.hash_ids):
        count = min(request.block_tokens, request.input_length - index * request.block_tokens)
        if count <= 0:
            return
        yield hash_id, count


def prompt_token_ids(request: TraceRequest, *, vocab_size: int) -> list[int]:
    """The request's whole prompt, `input_length` token ids (the last block is partial)."""
    ids = []
    for hash_id, count in _block_counts(request):
        ids.extend(block_token_ids(hash_id, count, vocab_size=vocab_size).tolist())
    return ids


def reusable_prefix_tokens(requests: list[TraceRequest], *, block_tokens: int | None = None
                           ) -> list[int]:
    """Per request, the prompt tokens a KV cache keyed by content could reuse on this
    trace: the longest run of its leading prompt tokens that the prompt of some earlier
    request (earlier in `requests`, whether or not it has finished) begins with, cut to
    leave the last prompt token (whose logits give the first output token, so it is always
    computed), rounded down to whole KV blocks of `block_tokens` tokens (default: the
    trace's block). Only prompts count: generated tokens are not in the trace."""
    children: dict[tuple[int, int], int] = {}  # (parent prefix, hash id) -> prefix
    held: list[int] = []  # prefix -> most tokens of its last block an earlier prompt had
    allowed = []
    for request in requests:
        full = request.block_tokens
        unit = block_tokens or full
        shared, prefix = 0, -1
        for hash_id, count in _block_counts(request):
            prefix = children.get((prefix, hash_id), -1)
            if prefix < 0:
                break
            shared += min(count, held[prefix])
            if count < full or held[prefix] < full:
                break
        allowed.append(min(shared, request.input_length - 1) // unit * unit)
        prefix = -1
        for hash_id, count in _block_counts(request):
            prefix = children.setdefault((prefix, hash_id), len(held))
            if prefix == len(held):
                held.append(0)
            held[prefix] = max(held[prefix], count)
    return allowed


def make_shared_prefix_trace(*, conversations: int = 64, turns: int = 4,
                             system_tokens: int = 3000,
                             message_tokens: tuple[int, int] = (200, 1000),
                             output_tokens: tuple[int, int] = (100, 400),
                             mean_arrival_gap_ms: float = 2000.0,
                             think_ms: tuple[float, float] = (5000.0, 30000.0),
                             seed: int = 0) -> list[dict]:
    """Mooncake-format rows (in timestamp order) of a chat service whose conversations
    all open with the same system prompt, as an OpenAI-style client sends them.

    Models: every prompt starts with the `system_tokens`-token system prompt, whose whole
    512-token blocks have the same hash ids (0, 1, ...) in every request (its last, partial
    block shares a block with the conversation's first message, so that block is the
    conversation's own). Conversations open at Poisson arrivals (exponential gaps of mean
    `mean_arrival_gap_ms`, ms). Each of the `turns` turns sends the whole conversation:
    the previous turn's prompt, its answer (`output_length` of that turn), and a new user
    message; it arrives a think time after the previous turn (uniform in `think_ms`,
    (min, max) ms; answers are expected well within it). A later turn keeps the ids of
    the previous prompt's whole blocks; its other blocks (the previous prompt's partial
    block, now extended, the answer and the message) get new ids (a replay generates its
    own answers, so blocks holding one could not be reused anyway). Message and answer
    lengths are uniform in `message_tokens` and `output_tokens`, (min, max) tokens
    inclusive. Seeded by `seed`.
    """
    if conversations < 1 or turns < 1 or system_tokens < 0:
        raise ValueError("conversations and turns must be >= 1, system_tokens >= 0")
    rng = np.random.default_rng(seed)
    system_blocks = system_tokens // TRACE_BLOCK_TOKENS
    next_id = system_blocks
    rows = []
    opened_ms = 0.0
    for _ in range(conversations):
        opened_ms += rng.exponential(mean_arrival_gap_ms)
        arrival_ms = opened_ms
        hash_ids = list(range(system_blocks))
        length = system_tokens
        previous = None
        for _ in range(turns):
            if previous is not None:
                arrival_ms += rng.uniform(*think_ms)
                length += previous["output_length"]
                del hash_ids[previous["input_length"] // TRACE_BLOCK_TOKENS:]
            length += int(rng.integers(message_tokens[0], message_tokens[1] + 1))
            while len(hash_ids) * TRACE_BLOCK_TOKENS < length:
                hash_ids.append(next_id)
                next_id += 1
            previous = {"timestamp": int(arrival_ms), "input_length": length,
                        "output_length": int(rng.integers(output_tokens[0],
                                                          output_tokens[1] + 1)),
                        "hash_ids": list(hash_ids)}
            rows.append(previous)
    rows.sort(key=lambda row: row["timestamp"])
    return rows


def write_trace(rows: list[dict], path: str) -> None:
    """Writes Mooncake-format rows, one JSON object a line."""
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jattn.bench.trace",
                                     description="Mooncake-format trace tools")
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("make-shared-prefix",
                               help="conversations that all open with one system prompt")
    make.add_argument("out", help="JSONL file to write")
    make.add_argument("--conversations", type=int, default=64)
    make.add_argument("--turns", type=int, default=4, help="turns per conversation")
    make.add_argument("--system-tokens", type=int, default=3000,
                      help="system prompt length (tokens); its whole 512-token blocks "
                           "are shared by every request")
    make.add_argument("--message-tokens", type=int, nargs=2, default=(200, 1000),
                      metavar=("MIN", "MAX"), help="user message length (tokens)")
    make.add_argument("--output-tokens", type=int, nargs=2, default=(100, 400),
                      metavar=("MIN", "MAX"), help="answer length (tokens)")
    make.add_argument("--mean-arrival-gap-ms", type=float, default=2000.0,
                      help="mean gap between conversations' first turns (ms)")
    make.add_argument("--think-ms", type=float, nargs=2, default=(5000.0, 30000.0),
                      metavar=("MIN", "MAX"), help="gap between a conversation's turns (ms)")
    make.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rows = make_shared_prefix_trace(
        conversations=args.conversations, turns=args.turns, system_tokens=args.system_tokens,
        message_tokens=tuple(args.message_tokens), output_tokens=tuple(args.output_tokens),
        mean_arrival_gap_ms=args.mean_arrival_gap_ms, think_ms=tuple(args.think_ms),
        seed=args.seed)
    write_trace(rows, args.out)
    print(f"{len(rows)} requests, {rows[-1]['timestamp'] / 1000:.1f} s, to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

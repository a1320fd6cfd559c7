"""A model step as a value: what the scheduler decides and the runner executes.

The scheduler builds one `StepPlan` per step; `ModelRunner.execute(plan)` runs it and
returns a `StepOutput`. In a group of processes the same plan (plain data, but for a
layer-wise `arrival`, which never runs in a group) is what process 0 sends to its
followers, which execute it on their own devices.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Protocol

import jax
import numpy as np

LOADING_CHUNK = 64
"""The most tokens a step with an `arrival` runs layer by layer; a turn's later tokens go
to the packed steps, batched with other turns."""


@dataclass(frozen=True)
class Draw:
    """How one sequence's next token is drawn: `key` (its stream's raw key data, two
    uint32, from `seed_key_data`), `number` (the draw the key is folded with: the
    sequence's count of earlier draws), and its `temperature`, `top_k` and `top_p`
    (see `jattn.sampling.SamplingParams`)."""

    key: tuple[int, int]
    number: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0


@dataclass(frozen=True)
class Segment:
    """One sequence's part of a step: `tokens` written at positions `start...` of the
    sequence whose pool blocks are `blocks` (covering every position up to
    `start + len(tokens)`). With `fed` set, the segment is one token that the host
    need not know: the one the previous step drew in row `fed` (`StepPlan.fed_tokens`);
    `tokens` then holds a placeholder."""

    tokens: tuple[int, ...]
    start: int
    blocks: tuple[int, ...]
    fed: int | None = None


@dataclass(frozen=True)
class ArrivingRows:
    """Some of the blocks arriving for one layer, on the device: the arrival's blocks
    `indices` (positions in `Arrival.block_ids`) are rows `0..len(indices)-1` of `k` and
    `v`, `[R, block_size, Hkv, D]` with R a power of two >= len(indices); rows past them
    are not the arrival's and are ignored."""

    indices: tuple[int, ...]
    k: jax.Array
    v: jax.Array


class LayerSource(Protocol):
    """KV arriving layer by layer (e.g. `jattn.store.layer_load.LayerwiseLoad`)."""

    def layer(self, index: int, *, after=None) -> list[ArrivingRows]:
        """Layer `index` of every block arriving, in pieces whose indices together are
        each block once, the same pieces every layer; once `after` (an array the step
        computed) is dispatched."""


@dataclass(frozen=True)
class Arrival:
    """KV coming from the store into pool blocks `block_ids`, layer by layer from
    `source`, while the step's one segment runs (each layer written before it is
    attended)."""

    block_ids: tuple[int, ...]
    source: LayerSource


@dataclass(frozen=True)
class BlockSave:
    """A pool block whose KV is to be saved under its content key."""

    key: bytes
    block: int


@dataclass(frozen=True)
class StepPlan:
    """One step: `saves` start copying out of the pool first (the step then donates
    it), then `segments` run packed, at most `max_seqs` of at most `prefill_chunk`
    tokens in all (none: the step only starts the saves). With an `arrival`, the plan
    holds exactly one segment of at most `LOADING_CHUNK` tokens and runs layer by
    layer. `sampled[i]`: whether segment i's last token's logits are sampled (a decode,
    or a prompt's last chunk); empty when no one samples. `all_logits`: the plan holds
    one segment and wants the logits of every one of its tokens (scoring a text, not
    serving it). `draws[i]`: how segment i's next token is drawn on the device (None:
    not drawn; empty: the step draws nothing), returned in `StepOutput.tokens`.
    `fed_tokens`: the previous step's `StepOutput.tokens`, which `fed` segments read."""

    segments: tuple[Segment, ...] = ()
    sampled: tuple[bool, ...] = ()
    arrival: Arrival | None = None
    saves: tuple[BlockSave, ...] = ()
    all_logits: bool = False
    draws: tuple[Draw | None, ...] = ()
    fed_tokens: jax.Array | None = None


@dataclass(frozen=True)
class StepOutput:
    """What a step gives back: `logits` `[R, V]` float32, row i for segment i (rows from
    len(segments) on are padding; with `all_logits`, row i for the segment's token i,
    rows past its tokens padding; None for a step without segments), and `saved()`,
    which waits for the copies of the plan's saves and returns `{pool block: BlockKV}`
    of those this process holds (None without saves; calling it again is free).
    `tokens`: with the plan's `draws`, `[max_seqs]` int32 on the device, row i the token
    drawn for segment i (other rows: anything); None without draws."""

    logits: jax.Array | None
    saved: Callable[[], dict] | None = None
    tokens: jax.Array | None = None


def with_fed_tokens(plan: StepPlan) -> StepPlan:
    """`plan` with its `fed` segments' tokens read from `fed_tokens` to the host (waiting
    for the step that drew them): for a runner whose steps cannot read them on the
    device, or a plan sent to other processes."""
    if plan.fed_tokens is None:
        return plan
    fed = np.asarray(plan.fed_tokens)
    segments = tuple(segment if segment.fed is None else
                     Segment((int(fed[segment.fed]),), segment.start, segment.blocks)
                     for segment in plan.segments)
    return dataclasses.replace(plan, segments=segments, fed_tokens=None)

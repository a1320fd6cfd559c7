"""A conversation's token history and the log that determines its KV cache.

The token history is the source of truth. The KV of the current context is a pure
function of the turn log: replaying the turns (truncate, prefill the turn's tokens,
feed its answer tokens one decode step at a time, with the same block-table widths)
reproduces it bit for bit. That is how a lost or corrupt entry is recomputed, and how
the path without a store computes the same tokens as the path with one.

Context layout: full blocks (each a per-session serial and the history range it holds)
then a tail of fewer than `block_size` tokens whose KV is recomputed at the next turn.
Truncation keeps the first `sink_blocks` blocks and drops the oldest others whole;
keys are position-free, so the kept blocks simply take the positions of their new
indices.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class Turn:
    """One turn: blocks dropped first, then history[start:user_end] prefilled, then the
    answer history[user_end:end] decoded (its last token's KV is left to the next turn).
    `table_blocks` is the width of the block table the turn ran with."""

    dropped: list[int]
    start: int
    user_end: int
    end: int
    table_blocks: int


@dataclass
class Conversation:
    """History, context blocks `[serial, start, end]`, tail start, and the turn log."""

    tokens: list[int] = field(default_factory=list)
    blocks: list[list[int]] = field(default_factory=list)
    tail_start: int = 0
    next_serial: int = 0
    turns: list[Turn] = field(default_factory=list)

    def to_record(self) -> dict:
        return asdict(self)

    @classmethod
    def from_record(cls, record: dict) -> "Conversation":
        fields = dict(record)
        fields["turns"] = [Turn(**t) for t in record["turns"]]
        return cls(**fields)

    @property
    def tail(self) -> list[int]:
        return self.tokens[self.tail_start:]

    def context_length(self) -> int:
        return sum(end - start for _, start, end in self.blocks) + len(self.tail)

    def serials(self) -> list[int]:
        return [serial for serial, _, _ in self.blocks]


def plan_truncation(conversation: Conversation, new_tokens: int, reserve: int, *,
                    max_context: int, sink_blocks: int) -> list[int]:
    """Serials of the oldest non-sink blocks to drop so that the context, the new
    tokens and `reserve` answer tokens fit `max_context`. Drops nothing if it fits."""
    length = conversation.context_length() + new_tokens + reserve
    dropped = []
    for serial, start, end in conversation.blocks[sink_blocks:]:
        if length <= max_context:
            break
        dropped.append(serial)
        length -= end - start
    return dropped


def apply_turn(conversation: Conversation, turn: Turn, block_size: int) -> list[list[int]]:
    """Records a finished turn: drops its blocks and cuts the newly computed tokens into
    full blocks (new serials). Returns the new `[serial, start, end]` blocks."""
    gone = set(turn.dropped)
    conversation.blocks = [b for b in conversation.blocks if b[0] not in gone]
    computed_end = turn.end - 1 if turn.end > turn.user_end else turn.user_end
    new_blocks = []
    start = turn.start
    while start + block_size <= computed_end:
        new_blocks.append([conversation.next_serial, start, start + block_size])
        conversation.next_serial += 1
        start += block_size
    conversation.blocks.extend(new_blocks)
    conversation.tail_start = start
    conversation.turns.append(turn)
    return new_blocks

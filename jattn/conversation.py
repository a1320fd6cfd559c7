"""A conversation's token history and the log that determines its KV cache.

The token history is the source of truth. The KV of the current context is a function
of the history and the turn log: prefilling the tokens the turns computed, with each
truncation dropping its blocks in between, reproduces it (within float rounding). That
is how a lost block of a truncated context is recomputed.

Context layout: full blocks (each a per-session serial and the history range it holds)
then a tail of fewer than `block_size` tokens whose KV is recomputed at the next turn.
Truncation keeps the first `sink_blocks` blocks and drops the oldest others whole;
keys are position-free, so the kept blocks simply take the positions of their new
indices.

Every full block has a 16-byte content key: `key = H(context key, its token ids)`, where
the context key is the key of the block before it in the context, the conversation's
root key (`root_key`: model, block size, the tenant's cache scope) for the first, and
after a truncation `H(context key, "drop", dropped serials)`; H is XXH3-128. The key names
exactly the tokens and context the block's KV was computed from: any request whose
context has the same key may use the block, whoever computed it, and a copy from another
history (left by a turn lost in a crash, or filed under the wrong name) never matches.

A session is recorded as its turns, one entry each (`turn_entry`), appended as they
complete; `Conversation.from_entries` rebuilds it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import xxhash


def root_key(fingerprint: str, block_size: int, scope: str = "") -> bytes:
    """The context key before a conversation's first block: the model (its fingerprint
    covers weights and dtype), the block size and the cache `scope` (the tenant's
    namespace and any per-request salt: different scopes never share a block)."""
    return xxhash.xxh3_128_digest(
        f"jattn context v1\0{fingerprint}\0{block_size}\0{scope}".encode())


def block_key(context_key: bytes, tokens) -> bytes:
    """The content key of a block of `tokens` (ids) following `context_key`."""
    return xxhash.xxh3_128_digest(context_key + np.asarray(tokens, "<i8").tobytes())


def truncated_key(context_key: bytes, dropped_serials) -> bytes:
    """The context key after the blocks `dropped_serials` left the context."""
    return xxhash.xxh3_128_digest(
        context_key + b"drop" + np.asarray(sorted(dropped_serials), "<i8").tobytes())


@dataclass
class Turn:
    """One turn: blocks dropped first, then history[start:user_end] prefilled, then the
    answer history[user_end:end] decoded (its last token's KV is left to the next turn)."""

    dropped: list[int]
    start: int
    user_end: int
    end: int

    @property
    def computed_end(self) -> int:
        """The end of the history whose KV the turn computed (its last answer token's
        KV is left to the next turn)."""
        return self.end - 1 if self.end > self.user_end else self.user_end


@dataclass
class Conversation:
    """History, context blocks `[serial, start, end]`, tail start, the turn log, each
    context block's content key (`keys`: serial -> 16 bytes) and the context key the
    next block chains from."""

    tokens: list[int] = field(default_factory=list)
    blocks: list[list[int]] = field(default_factory=list)
    tail_start: int = 0
    next_serial: int = 0
    turns: list[Turn] = field(default_factory=list)
    keys: dict[int, bytes] = field(default_factory=dict)
    context_key: bytes = b""

    @classmethod
    def from_entries(cls, entries: list[dict], block_size: int) -> "Conversation":
        """The conversation whose turns `turn_entry` recorded as `entries`, in order."""
        conversation = cls(context_key=bytes.fromhex(entries[0]["root"]))
        for entry in entries:
            conversation.tokens.extend(entry["tokens"])
            apply_turn(conversation, Turn(**entry["turn"]), block_size)
        return conversation

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


def turn_entry(conversation: Conversation, turn: Turn, first_token: int,
               root: bytes | None = None) -> dict:
    """A finished turn as a record entry (JSON-able): the turn and the history tokens
    it added, `conversation.tokens[first_token:turn.end]`; the first turn's also holds
    the conversation's `root` key."""
    entry = {"turn": asdict(turn), "tokens": conversation.tokens[first_token:turn.end]}
    if root is not None:
        entry["root"] = root.hex()
    return entry


def context_keys(conversation: Conversation) -> list[bytes]:
    """The content keys of the conversation's context blocks, in context order."""
    return [conversation.keys[serial] for serial, _, _ in conversation.blocks]


def is_history_prefix(blocks: list[list[int]], block_size: int) -> bool:
    """True if context `blocks` are the history's leading blocks, in order (nothing
    was ever truncated out of them): their KV is then a prefill of the history."""
    return all(start == i * block_size for i, (_, start, _) in enumerate(blocks))


def chained_keys(context_key: bytes, tokens: list[int], block_size: int) -> list[bytes]:
    """The keys of the full blocks of `tokens`, chained from `context_key`."""
    keys = []
    for start in range(0, len(tokens) - block_size + 1, block_size):
        context_key = block_key(context_key, tokens[start:start + block_size])
        keys.append(context_key)
    return keys


def apply_turn(conversation: Conversation, turn: Turn, block_size: int) -> list[list[int]]:
    """Records a finished turn (its tokens already in the history): drops its blocks and
    cuts the newly computed tokens into full blocks (new serials, with their keys).
    Returns the new `[serial, start, end]` blocks."""
    gone = set(turn.dropped)
    conversation.blocks = [b for b in conversation.blocks if b[0] not in gone]
    if gone:
        conversation.context_key = truncated_key(conversation.context_key, gone)
        for serial in gone:
            conversation.keys.pop(serial, None)
    new_blocks = []
    start = turn.start
    while start + block_size <= turn.computed_end:
        key = block_key(conversation.context_key, conversation.tokens[start:start + block_size])
        conversation.keys[conversation.next_serial] = conversation.context_key = key
        new_blocks.append([conversation.next_serial, start, start + block_size])
        conversation.next_serial += 1
        start += block_size
    conversation.blocks.extend(new_blocks)
    conversation.tail_start = start
    conversation.turns.append(turn)
    return new_blocks

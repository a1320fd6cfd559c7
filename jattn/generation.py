"""What a generation returns, and the incremental text of a stream of tokens."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Generation:
    """The result of one `LLM.generate`.

    `token_ids` are the new tokens only; `finish_reason` is "stop" (end-of-sequence token
    or a stop string) or "length" (`max_tokens` or the context window reached);
    `ttft_s` is the time to the first new token in seconds.
    """

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_token_ids: list[int] = field(default_factory=list)
    ttft_s: float = 0.0
    logprobs: list[TokenLogprob] | None = None
    """With `logprobs` asked for: one per token of `token_ids`."""


@dataclass(frozen=True)
class TokenLogprob:
    """A drawn token's log-probability (natural log) under the model's own distribution:
    the log-softmax of its logits, before temperature, top-k and top-p; and `top`, the
    most likely tokens' `(id, log-probability)`, most likely first."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class StreamedToken:
    """One new token: its id, the text it adds (may be "" while a multi-byte
    character is incomplete), and its log-probabilities when they were asked for."""

    id: int
    text: str
    logprob: TokenLogprob | None = None


class IncrementalText:
    """Decodes a growing list of ids into text deltas, at a constant cost per id.

    Each push decodes a short window of ids, from the start of the previous delta's ids
    on, with and without the new id, and emits the difference: decoding ids in context
    (not one by one) keeps spaces and multi-byte characters right, and the window keeps
    the cost from growing with the text. A delta is held back ("") while the window ends
    in an incomplete character. `text` is every delta so far.
    """

    def __init__(self, decode):
        self._decode = decode
        self._ids: list[int] = []
        self._window = 0  # where the window starts: the ids of the last delta on
        self._emitted = 0  # ids already in `text`
        self.text = ""

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        known = self._decode(self._ids[self._window:self._emitted])
        window = self._decode(self._ids[self._window:])
        if len(window) <= len(known) or window.endswith("\ufffd"):
            return ""
        delta = window[len(known):]
        self._window, self._emitted = self._emitted, len(self._ids)
        self.text += delta
        return delta

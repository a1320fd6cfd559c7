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


@dataclass(frozen=True)
class StreamedToken:
    """One new token: its id and the text it adds (may be "" while a multi-byte
    character is incomplete)."""

    id: int
    text: str


class IncrementalText:
    """Decodes a growing list of ids into text deltas.

    Decoding the whole list each time (and diffing) keeps spaces and multi-byte
    characters right, which decoding tokens one by one does not.
    """

    def __init__(self, decode):
        self._decode = decode
        self._ids: list[int] = []
        self.text = ""

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        text = self._decode(self._ids)
        if text.endswith("\ufffd"):
            return ""
        delta = text[len(self.text):]
        self.text = text
        return delta

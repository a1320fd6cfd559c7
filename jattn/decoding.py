"""The decode side of one sequence: its draws (key, parameters), stop rules, text."""

from __future__ import annotations

import time

from jattn.generation import Generation, IncrementalText, StreamedToken, TokenLogprob
from jattn.model.step_plan import Draw
from jattn.sampling import SamplingParams, seed_key_data


def cut_at_stop(text: str, stops: tuple[str, ...]) -> str:
    """`text` up to the earliest stop string, or all of it."""
    cuts = [text.find(s) for s in stops if s in text]
    return text[:min(cuts)] if cuts else text


class Continuation:
    """What one sequence has generated so far, and when it must stop.

    `take(token)` accepts each sampled token: it returns the `StreamedToken` to deliver,
    or None when the token ends the generation (an id in `eos`, or a stop string
    appearing: neither is delivered). After `budget` tokens it is `finished` too. The
    `result` gets `ttft_s` (from `start_time`, seconds), `finish_reason` and `text` (cut
    at the stop string).
    """

    def __init__(self, params: SamplingParams, *, budget: int, eos: set[int], tokenizer,
                 result: Generation, start_time: float):
        self.params = params
        self.budget = budget
        self.eos = eos
        self.result = result
        self.start_time = start_time
        self.steps = 0
        self.finished = False
        self.key = tuple(int(half) for half in seed_key_data(
            params.seed if params.seed is not None else time.time_ns() % 2**64))
        self.draws = 0  # the key of draw n is `key` folded with n
        self._text = IncrementalText(tokenizer.decode) if tokenizer else None
        result.finish_reason = "length"
        if params.logprobs is not None:
            result.logprobs = []

    def draw(self) -> Draw:
        """How this sequence's next token is drawn (each call is the next draw)."""
        p = self.params
        self.draws += 1
        return Draw(self.key, self.draws - 1, p.temperature, p.top_k, p.top_p)

    def take(self, token: int, logprob: TokenLogprob | None = None) -> StreamedToken | None:
        """`token` drawn (with its `logprob` if asked for): what to deliver, or None."""
        if self.steps == 0:
            self.result.ttft_s = time.perf_counter() - self.start_time
        self.steps += 1
        if token in self.eos:
            return self._finish("stop")
        delta = self._text.push(token) if self._text else ""
        if delta and self._ends_in_stop(len(delta)):
            return self._finish("stop")
        self.result.token_ids.append(token)
        if self.result.logprobs is not None:
            self.result.logprobs.append(logprob)
        if self.steps >= self.budget:
            self._finish("length")
        return StreamedToken(token, delta, logprob)

    def _ends_in_stop(self, added: int) -> bool:
        """Whether a stop string appears in the text's last `added` characters, or
        across them and the ones before (it did not appear before)."""
        text = self._text.text
        return any(stop in text[-(added + len(stop) - 1):] for stop in self.params.stop)

    def finish(self, reason: str) -> None:
        """Ends the generation early (for example "cancelled")."""
        self._finish(reason)

    def _finish(self, reason: str) -> None:
        self.finished = True
        self.result.finish_reason = reason
        if self._text:
            self.result.text = cut_at_stop(self._text.text, self.params.stop)
        return None

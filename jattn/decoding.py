"""The decode side of one sequence: sampling keys, stop rules, text; and the sampling of
a decode batch's next tokens in one call."""

from __future__ import annotations

import time
import numpy as np

from jattn.generation import Generation, IncrementalText, StreamedToken
from jattn.sampling import SamplingParams, sample_rows, seed_key_data


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
        self.key_data = seed_key_data(params.seed if params.seed is not None
                                      else time.time_ns() % 2**64)
        self.draws = 0  # the key of draw n is `key` folded with n
        self._text = IncrementalText(tokenizer.decode) if tokenizer else None
        result.finish_reason = "length"

    def sample(self, logits) -> int:
        """A token from this sequence's logits `[V]` under its sampling parameters."""
        return sample_next([self], logits[None])[0]

    def take(self, token: int) -> StreamedToken | None:
        if self.steps == 0:
            self.result.ttft_s = time.perf_counter() - self.start_time
        self.steps += 1
        if token in self.eos:
            return self._finish("stop")
        delta = self._text.push(token) if self._text else ""
        if self._text and self.params.stop and any(s in self._text.text
                                                   for s in self.params.stop):
            return self._finish("stop")
        self.result.token_ids.append(token)
        if self.steps >= self.budget:
            self._finish("length")
        return StreamedToken(token, delta)

    def finish(self, reason: str) -> None:
        """Ends the generation early (for example "cancelled")."""
        self._finish(reason)

    def _finish(self, reason: str) -> None:
        self.finished = True
        self.result.finish_reason = reason
        if self._text:
            self.result.text = cut_at_stop(self._text.text, self.params.stop)
        return None


def sample_next(continuations: list[Continuation | None], logits) -> list[int | None]:
    """The next token of each continuation, continuation i's from row i of
    `logits [R, V]` (R >= len(continuations); later rows, and rows whose continuation
    is None, are not sampled: None), in one call: a batch costs one sampling dispatch
    and one transfer of R token ids."""
    rows = logits.shape[0]
    key_data = None
    draws = np.zeros(rows, np.int32)
    temperature = np.zeros(rows, np.float32)  # rows not sampled: greedy, the cheapest
    top_k = np.zeros(rows, np.int32)
    top_p = np.ones(rows, np.float32)
    for row, continuation in enumerate(continuations):
        if continuation is None:
            continue
        if key_data is None:
            key_data = np.zeros((rows, *continuation.key_data.shape),
                                continuation.key_data.dtype)
        p = continuation.params
        key_data[row], draws[row] = continuation.key_data, continuation.draws
        temperature[row], top_p[row] = p.temperature, p.top_p
        top_k[row] = min(p.top_k, logits.shape[-1])  # past the vocabulary: all of it
        continuation.draws += 1
    if key_data is None:
        return [None] * len(continuations)
    tokens = np.asarray(sample_rows(logits, key_data, draws, temperature, top_k, top_p))
    return [int(token) if continuation is not None else None
            for token, continuation in zip(tokens, continuations)]

"""The decode side of one sequence: sampling keys, stop rules, text; and the single-
sequence decode loop shared by `LLM.generate`/`stream` and chat turns."""

from __future__ import annotations

import time
from typing import Iterator

import jax

from jattn.generation import Generation, IncrementalText, StreamedToken
from jattn.model.runner import ModelRunner
from jattn.sampling import SamplingParams, sample


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
        self._key = jax.random.key(params.seed if params.seed is not None else time.time_ns())
        self._text = IncrementalText(tokenizer.decode) if tokenizer else None
        result.finish_reason = "length"

    def next_key(self):
        self._key, subkey = jax.random.split(self._key)
        return subkey

    def sample(self, logits) -> int:
        """A token from this sequence's logits `[V]` under its sampling parameters."""
        p = self.params
        return int(sample(logits[None], self.next_key(), p.temperature, p.top_k, p.top_p)[0])

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


def decode_loop(runner: ModelRunner, logits, blocks: list[int], position: int,
                continuation: Continuation) -> Iterator[StreamedToken]:
    """Samples after the prefill's last `logits [V]`, feeding each token back at
    `position, position + 1, ...` of the sequence in `blocks`, until `continuation` is
    finished. Yields each delivered token."""
    while not continuation.finished:
        streamed = continuation.take(continuation.sample(logits))
        if streamed is None:
            return
        yield streamed
        if not continuation.finished:
            logits = runner.decode([streamed.id], [position + continuation.steps - 1],
                                   [blocks])[0]

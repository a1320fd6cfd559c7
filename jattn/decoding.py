"""The decode loop shared by `LLM.generate`/`stream` and chat turns."""

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


def decode_loop(runner: ModelRunner, logits, blocks: list[int], position: int, budget: int,
                params: SamplingParams, *, eos: set[int], tokenizer, result: Generation,
                start_time: float) -> Iterator[StreamedToken]:
    """Samples up to `budget` tokens after the prefill's last `logits [V]`, feeding each
    back at `position, position + 1, ...` of the sequence in `blocks`.

    Yields each kept token; stops at a token in `eos` or when a stop string appears
    (neither is yielded). Fills `result.ttft_s`, `.finish_reason` and `.text`
    (cut at the stop string).
    """
    key = jax.random.key(params.seed if params.seed is not None else time.time_ns())
    text = IncrementalText(tokenizer.decode) if tokenizer else None
    logits = logits[None]
    result.finish_reason = "length"
    for step in range(budget):
        key, subkey = jax.random.split(key)
        token = int(sample(logits, subkey, params.temperature, params.top_k,
                           params.top_p)[0])
        if step == 0:
            result.ttft_s = time.perf_counter() - start_time
        if token in eos:
            result.finish_reason = "stop"
            break
        delta = text.push(token) if text else ""
        if text and params.stop and any(s in text.text for s in params.stop):
            result.finish_reason = "stop"
            break
        yield StreamedToken(token, delta)
        if step + 1 < budget:
            logits = runner.decode([token], [position + step], [blocks])
    if text:
        result.text = cut_at_stop(text.text, params.stop)

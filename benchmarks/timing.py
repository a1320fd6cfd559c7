"""Wall-clock timing of jitted JAX calls: warm up (compile), then the median of repeats."""

from __future__ import annotations

import statistics
import time

import jax


def median_seconds(fn, *args, repeats: int = 5) -> float:
    """Median wall time in seconds of `fn(*args)` after one warm-up call.

    Every call is waited for with `block_until_ready`, so asynchronous dispatch does not
    hide work.
    """
    jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)

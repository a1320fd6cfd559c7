"""Test set-up: 8 simulated CPU devices for mesh tests (must precede importing jax), and
the compiled programs of each test module dropped when it ends."""

import gc
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_programs():
    """Every XLA CPU executable keeps its code mapped (hundreds of memory maps per model
    configuration); the whole suite in one process would pass the kernel's limit on maps
    per process (65,530 by default) and crash inside the compiler. Nothing compiled for
    one module is needed by the next."""
    yield
    gc.collect()
    jax.clear_caches()

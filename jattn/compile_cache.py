"""JAX's persistent compilation cache, so a restarted process skips compiling."""

from __future__ import annotations

import os

import jax


def use_compilation_cache(directory: str | None) -> None:
    """Keeps every compiled program under `directory` (`~` expanded); None: off."""
    if directory:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(directory))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

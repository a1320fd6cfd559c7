"""Test set-up: 8 simulated CPU devices for mesh tests (must precede importing jax)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

"""Which implementation runs: the one place that decides.

Public names, as accepted by every kernel entry point's `backend=` argument:

  "auto"        the Pallas kernel of the platform on GPU and TPU; the tiled XLA path on CPU.
  "pallas"      the Pallas kernel of the platform; on CPU the GPU variant in interpret mode.
  "pallas_gpu"  the Triton variant: compiled on GPU, interpreted elsewhere.
  "pallas_tpu"  the Mosaic variant: compiled on TPU, interpreted (TPU interpret mode,
                which simulates DMAs and semaphores) elsewhere.
  "xla"         the tiled jnp path (split-K decode, blockwise prefill).
  "reference"   the dense jnp oracle; materialises every score.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax

BACKENDS = ("auto", "pallas", "pallas_gpu", "pallas_tpu", "xla", "reference")


@dataclass(frozen=True)
class Choice:
    """A resolved backend: `kind` in {"pallas_gpu", "pallas_tpu", "xla", "reference"}."""

    kind: str
    interpret: bool = False


def platform() -> str:
    """The default device's platform: "cpu", "gpu" or "tpu"."""
    return jax.default_backend()


def resolve(backend: str) -> Choice:
    """Maps a public backend name to the implementation that runs on this platform."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    here = platform()
    if backend == "auto":
        backend = "pallas" if here in ("gpu", "tpu") else "xla"
    if backend == "pallas":
        backend = "pallas_tpu" if here == "tpu" else "pallas_gpu"
    if backend == "pallas_gpu":
        return Choice("pallas_gpu", interpret=here != "gpu")
    if backend == "pallas_tpu":
        return Choice("pallas_tpu", interpret=here != "tpu")
    return Choice(backend)

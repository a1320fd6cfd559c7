"""The backend names resolve to the implementation the docs promise on this platform."""

import pytest

from pallas_kernels import backend


@pytest.mark.parametrize("name,kind,interpret", [
    ("auto", "xla", False),
    ("pallas", "pallas_gpu", True),
    ("pallas_gpu", "pallas_gpu", True),
    ("pallas_tpu", "pallas_tpu", True),
    ("xla", "xla", False),
    ("reference", "reference", False),
])
def test_cpu_resolution(monkeypatch, name, kind, interpret):
    monkeypatch.setattr(backend, "platform", lambda: "cpu")
    assert backend.resolve(name) == backend.Choice(kind, interpret)


def test_accelerator_resolution(monkeypatch):
    monkeypatch.setattr(backend, "platform", lambda: "tpu")
    assert backend.resolve("auto") == backend.Choice("pallas_tpu", False)
    assert backend.resolve("pallas_gpu") == backend.Choice("pallas_gpu", True)
    monkeypatch.setattr(backend, "platform", lambda: "gpu")
    assert backend.resolve("auto") == backend.Choice("pallas_gpu", False)
    assert backend.resolve("pallas_tpu") == backend.Choice("pallas_tpu", True)

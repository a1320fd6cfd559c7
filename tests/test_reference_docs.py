"""The reference pages in docs/ are what the code generates: they cannot drift."""

import pytest

from serve import reference


@pytest.mark.parametrize("page, build", [("configuration.md", reference.configuration_markdown),
                                         ("grpc.md", reference.grpc_markdown),
                                         ("api.md", reference.api_markdown)])
def test_committed_reference_matches_the_code(page, build):
    committed = (reference.DOCS / page).read_text()
    assert committed == build(), f"docs/{page} is stale: run python -m serve.reference"


def test_every_serve_key_and_rpc_is_documented():
    config = reference.configuration_markdown()
    for key in reference.ServeConfig.__dataclass_fields__:
        assert f"| `{key}` |" in config
    grpc = reference.grpc_markdown()
    for rpc in ("Chat", "EndSession", "DescribeSession", "ServerStats", "Decode",
                "HealthCheck"):
        assert f"- `{rpc}(" in grpc


def test_every_public_kernel_function_is_documented():
    import jattn.distributed
    import pallas_kernels

    api = reference.api_markdown()
    for module in (pallas_kernels, jattn.distributed):
        for name in module.__all__:
            if callable(getattr(module, name)):
                assert f"### `{module.__name__}.{name}`" in api
    assert "context_parallel_attention(q, k, v, *, mesh" in api

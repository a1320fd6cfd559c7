"""Regenerates the Python modules of `serve/protos/*.proto`.

    python -m serve.protos.generate

Each `NAME.proto` gives, next to it, `NAME_pb2.py` (the messages), `NAME_pb2.pyi` (their
types) and `NAME_pb2_grpc.py` (client stub and servicer). Proto paths are taken from the
repository root, so the generated modules import each other as `serve.protos.*` and the
descriptors are named `serve/protos/NAME.proto`. Needs grpcio-tools (the `dev` extra);
the generated code records the grpcio-tools and protobuf versions that made it, and
`tests/test_protos.py` checks that the committed modules match their sources.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
ROOT = PROTO_DIR.parent.parent
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def sources() -> list[Path]:
    """The `.proto` files, in a fixed order."""
    return sorted(PROTO_DIR.glob("*.proto"))


def generated_names() -> list[str]:
    """File names of the modules generated from `sources()`."""
    return [p.stem + suffix for p in sources() for suffix in SUFFIXES]


def generate(out_dir: Path | str = ROOT) -> list[Path]:
    """Runs protoc with the gRPC plugin on every `.proto`, writing under `out_dir` (by
    default the repository root, i.e. next to the sources). Returns the written files."""
    from grpc_tools import protoc

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = resources.files("grpc_tools") / "_proto"
    args = ["grpc_tools.protoc", f"--proto_path={ROOT}", f"--proto_path={well_known}",
            f"--python_out={out_dir}", f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}", *(str(p) for p in sources())]
    status = protoc.main(args)
    if status != 0:
        raise RuntimeError(f"protoc failed with status {status}: {' '.join(args)}")
    target = out_dir / PROTO_DIR.relative_to(ROOT)
    return [target / name for name in generated_names()]


def main() -> int:
    for path in generate():
        print(path.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())

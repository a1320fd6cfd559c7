"""Writes the reference pages of `docs/` from the code, so they cannot drift.

    python -m serve.reference          # rewrites docs/configuration.md, grpc.md, api.md

`docs/configuration.md` lists every `jattn-serve` key (from `ServeConfig`: flag, default,
meaning) and every `StoreConfig` argument (from its docstring). `docs/grpc.md` lists the
services, methods and messages of `serve/protos/*.proto` with their comments, read from
protoc's source info (needs grpcio-tools, the `dev` extra). `tests/test_reference_docs.py`
checks that the committed pages equal what this writes. `docs/api.md` is the kernels'
and DistAttention's public functions, with their signatures and docstrings.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys
import tempfile
from pathlib import Path

from jattn.store import StoreConfig
from serve.config import ServeConfig
from serve.protos.generate import ROOT, sources

DOCS = ROOT / "docs"


def configuration_markdown() -> str:
    lines = ["# Configuration reference", "",
             "Generated from the code by `python -m serve.reference`; do not edit.", "",
             "## `jattn-serve` (`serve.config.ServeConfig`)", "",
             "Every key is a command-line flag and a key of the YAML file given with "
             "`--config` (flags win). Byte sizes take suffixes (`512MiB`, `8GiB`, `1GB`). "
             "`configs/serve/default.yaml` lists them all.", "",
             "| key | flag | default | meaning |", "| --- | --- | --- | --- |"]
    for f in dataclasses.fields(ServeConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flag = "--auth-token (repeatable)" if f.name == "auth_tokens" else \
            "--" + f.name.replace("_", "-")
        if f.type == "bool":
            flag = f"{flag} / --no-{f.name.replace('_', '-')}"
        lines.append(f"| `{f.name}` | `{flag}` | `{default!r}` | {f.metadata['help']} |")
    lines += ["", "## The AttentionStore (`jattn.StoreConfig`)", "",
              "| argument | default | meaning |", "| --- | --- | --- |"]
    meanings = _docstring_args(StoreConfig.__doc__)
    for f in dataclasses.fields(StoreConfig):
        lines.append(f"| `{f.name}` | `{f.default!r}` | {meanings[f.name]} |")
    return "\n".join(lines) + "\n"


def _docstring_args(doc: str) -> dict[str, str]:
    """`name: text` entries of a docstring's Args section, continuation lines joined."""
    args, current = {}, None
    for line in inspect.cleandoc(doc).split("Args:", 1)[1].splitlines():
        match = re.match(r"\s{2}(\w+): (.*)", line)
        if match:
            current = match.group(1)
            args[current] = match.group(2).strip()
        elif current and line.strip():
            args[current] += " " + line.strip()
    return args


def grpc_markdown() -> str:
    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.pb"
        status = protoc.main(["grpc_tools.protoc", f"--proto_path={ROOT}",
                              "--include_source_info", f"--descriptor_set_out={out}",
                              *(str(p) for p in sources())])
        if status != 0:
            raise RuntimeError(f"protoc failed with status {status}")
        files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    lines = ["# gRPC API reference", "",
             "Generated from `serve/protos/*.proto` by `python -m serve.reference`; do not "
             "edit. Server reflection and `grpc.health.v1.Health` are served too. With "
             "`auth_tokens` set, every call but `grpc.health.v1.Health`'s needs "
             "`authorization: Bearer <token>` metadata (else UNAUTHENTICATED); see "
             "[the failure model](failure_model.md) for what each fault looks like.", ""]
    for proto in files:
        comments = {tuple(loc.path): loc.leading_comments.strip()
                    for loc in proto.source_code_info.location if loc.leading_comments}
        lines += [f"## `{proto.package}` — `{proto.name}`", ""]
        for s, service in enumerate(proto.service):
            lines += [f"### service `{proto.package}.{service.name}`", "",
                      _text(comments.get((6, s))), ""]
            for m, method in enumerate(service.method):
                stream = "stream " if method.server_streaming else ""
                lines += [f"- `{method.name}({_short(method.input_type)}) returns "
                          f"({stream}{_short(method.output_type)})`: "
                          f"{_text(comments.get((6, s, 2, m)))}"]
            lines.append("")
        for index, message in enumerate(proto.message_type):
            lines += _message(message, (4, index), comments, prefix="")
    return "\n".join(lines).rstrip() + "\n"


def _message(message, path, comments, *, prefix) -> list[str]:
    name = f"{prefix}{message.name}"
    lines = [f"### message `{name}`", "", _text(comments.get(path)), ""]
    if message.field:
        lines += ["| field | number | type | meaning |", "| --- | ---: | --- | --- |"]
        for index, field in enumerate(message.field):
            label = "repeated " if field.label == field.LABEL_REPEATED else ""
            kind = _short(field.type_name) if field.type_name else \
                field.Type.Name(field.type)[5:].lower()
            meaning = _text(comments.get((*path, 2, index))).replace("\n", " ")
            lines.append(f"| `{field.name}` | {field.number} | `{label}{kind}` | {meaning} |")
        lines.append("")
    for index, nested in enumerate(message.nested_type):
        if not nested.options.map_entry:
            lines += _message(nested, (*path, 3, index), comments, prefix=f"{name}.")
    return lines


def _short(type_name: str) -> str:
    return type_name.rsplit(".", 1)[-1]


def _text(comment: str | None) -> str:
    return " ".join((comment or "").split())


def api_markdown() -> str:
    """The public surface of `pallas_kernels` and `jattn.distributed`, from the code."""
    import jattn.distributed
    import pallas_kernels
    from pallas_kernels import backend

    lines = ["# Kernel and DistAttention API reference", "",
             "Generated from the docstrings by `python -m serve.reference`; do not edit. "
             "These are the public functions; the modules behind them (one per backend) "
             "are internal.", ""]
    for module in (pallas_kernels, jattn.distributed):
        lines += [f"## `{module.__name__}`", "", inspect.cleandoc(module.__doc__), ""]
        if module is pallas_kernels:
            lines += ["### Backends (`backend=`)", "", "```text",
                      inspect.cleandoc(backend.__doc__).split("\n\n", 1)[1], "```", ""]
        for name in sorted(module.__all__):
            member = getattr(module, name)
            if not callable(member):
                continue
            kind = "class " if inspect.isclass(member) else ""
            lines += [f"### `{module.__name__}.{name}`", "", "```python",
                      f"{kind}{name}{inspect.signature(member)}", "```", "",
                      "```text", inspect.cleandoc(member.__doc__ or ""), "```", ""]
    return "\n".join(lines)


def write() -> list[Path]:
    DOCS.mkdir(exist_ok=True)
    pages = {DOCS / "configuration.md": configuration_markdown(),
             DOCS / "grpc.md": grpc_markdown(), DOCS / "api.md": api_markdown()}
    for path, text in pages.items():
        path.write_text(text)
    return list(pages)


def main() -> int:
    for path in write():
        print(path.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Wire definitions of jattn-serve and their generated Python modules.

- `jattn.proto` (package `jattn.v1`): the `Conversations` service —
  `from serve.protos import jattn_pb2, jattn_pb2_grpc`.
- `jetstream.proto` (package `jetstream_proto`): JetStream's `Orchestrator` contract, so
  JetStream clients drive jattn unchanged — `from serve.protos import jetstream_pb2,
  jetstream_pb2_grpc`.

The `*_pb2*.py(i)` modules are generated; edit the `.proto` files and run
`python -m serve.protos.generate`.
"""

"""The `jattn-serve` and `jattn` commands.

    jattn-serve [--config configs/serve/default.yaml] [--port 50051] ...
    jattn serve ...                      the same
    jattn chat [--server ADDR] [--session ID]   an interactive conversation
    jattn describe ID | end ID | stats   one call each
    jattn demo                           a scripted conversation, reuse on against off
    jattn bench replay --trace PATH ...  replay a Mooncake-format trace
    jattn bench simulate --trace PATH ...   the store's placement at the trace's size
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import uuid

import grpc

from serve.client import Client


def serve_main(argv=None) -> int:
    from serve.config import add_arguments, from_arguments  # loads jax: only when serving

    parser = argparse.ArgumentParser(prog="jattn-serve", description="Serve a model over gRPC and the OpenAI HTTP API.")
    add_arguments(parser)
    return _serve(from_arguments(parser.parse_args(argv)))


def _serve(config) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if config.coordinator:
        from jattn.distributed import group

        group.initialize(config.coordinator, config.num_processes, config.process_id,
                         step_timeout_s=config.step_timeout_s)
        if not group.is_leader():
            return _follow(config)
    from serve.server import Server

    server = Server(config).start()
    threading.Thread(target=_freeze_long_lived_objects, args=(server.llm,), daemon=True,
                     name="jattn-gc-freeze").start()
    print(f"jattn-serve listening on {server.config.host}:{server.port}", flush=True)
    if server.http_port is not None:
        print(f"jattn-serve HTTP (OpenAI API) on http{'s' if server.config.tls_cert else ''}"
              f"://{server.config.host}:{server.http_port}/v1", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    print("jattn-serve: stopping (finishing turns in flight, flushing the store)", flush=True)
    server.stop()
    return 0


def _freeze_long_lived_objects(llm) -> None:
    """Waits for the warm-up's background compilation, then moves every object alive
    (the model, its compiled programs, the server: this process's for its whole life)
    out of the garbage collector's full passes (`gc.freeze`), which would otherwise scan
    them all again every few thousand requests, pausing every thread for 0.1 s where a
    decode step takes 1 ms. Only for a process that serves one model until it exits:
    what is frozen is never collected."""
    import gc

    llm.chats.wait_compiled()
    gc.collect()
    gc.freeze()


def _follow(config) -> int:
    """A process of a group other than 0: builds the same model and pool share and runs
    process 0's steps until it stops; a failed collective (process 0 died) exits
    non-zero."""
    import jax

    from jattn.compile_cache import use_compilation_cache
    from jattn.distributed.group import exit_group
    from serve.server import build_llm

    use_compilation_cache(config.compilation_cache_dir)
    llm = build_llm(config)
    print(f"jattn-serve process {jax.process_index()} of {jax.process_count()}: following "
          "process 0's steps", flush=True)
    try:
        llm.follow()
    except Exception as error:  # noqa: BLE001 - any failure of the group ends this process
        exit_group(f"process {jax.process_index()} lost the group ({error!r})")
    print("jattn-serve: process 0 stopped the group", flush=True)
    return 0


def _client(args) -> Client:
    tls_ca = None
    if args.tls_ca:
        with open(args.tls_ca, "rb") as f:
            tls_ca = f.read()
    return Client(args.server, token=args.token or os.environ.get("JATTN_TOKEN"),
                  tls_ca=tls_ca)


def _chat(args) -> int:
    """A conversation typed at the terminal, over gRPC (`--server host:port`) or the
    OpenAI HTTP API (`--server http://host:port`); each answer is followed by its facts."""
    session = args.session or uuid.uuid4().hex[:12]
    over_http = args.server.startswith(("http://", "https://"))
    turn = _http_turns(args, session) if over_http else _grpc_turns(args, session)
    print(f"session {session} on {args.server}; an empty line or Ctrl-D ends", flush=True)
    while True:
        try:
            message = input("you> ").strip()
        except EOFError:
            break
        if not message:
            break
        print("model> ", end="", flush=True)
        facts = None
        for text, turn_facts in turn(message):
            facts = turn_facts or facts
            print(text, end="", flush=True)
        if facts is not None:
            ttft_s, cached, tier_blocks, computed = facts
            tiers = ", ".join(f"{k} {v}" for k, v in sorted(tier_blocks.items())) or "-"
            print(f"\n  [ttft {ttft_s * 1e3:.0f} ms, {cached} tokens reused (blocks: "
                  f"{tiers}), {computed} computed]")
    return 0


def _grpc_turns(args, session: str):
    """One turn over gRPC `Chat`: yields (text, facts or None) per event."""
    client = _client(args)

    def turn(message):
        for event in client.chat_events(session, message, max_tokens=args.max_tokens,
                                        temperature=args.temperature):
            facts = None
            if event.HasField("facts"):
                f = event.facts
                facts = (f.ttft_s, f.cached_tokens, dict(f.tier_blocks), f.recomputed_tokens)
            yield event.text, facts
    return turn


def _http_turns(args, session: str):
    """One turn over the OpenAI API (streamed chat completions in session `session`):
    yields (text, facts or None) per chunk."""
    try:
        import openai
    except ImportError:
        raise SystemExit("jattn chat over HTTP needs the openai package: "
                         "pip install 'jattn[client]'") from None
    base = args.server.rstrip("/")
    client = openai.OpenAI(base_url=base if base.endswith("/v1") else base + "/v1",
                           api_key=args.token or os.environ.get("JATTN_TOKEN") or "none")
    model = client.models.list().data[0].id

    def turn(message):
        for chunk in client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": message}],
                max_tokens=args.max_tokens, temperature=args.temperature, stream=True,
                stream_options={"include_usage": True},
                extra_headers={"X-Session-ID": session}):
            if chunk.usage is not None:
                extra = chunk.usage.model_extra.get("jattn", {})
                yield "", (extra.get("ttft_s", 0.0),
                           chunk.usage.prompt_tokens_details.cached_tokens,
                           extra.get("tier_blocks", {}), extra.get("recomputed_tokens", 0))
            elif chunk.choices:
                yield chunk.choices[0].delta.content or "", None
    return turn


def _describe(args) -> int:
    from serve.stats_tables import as_json, session_table

    info = _client(args).describe(args.session_id)
    print(as_json(info) if args.json else session_table(info))
    return 0


def _end(args) -> int:
    existed = _client(args).end_session(args.session_id)
    print("ended" if existed else "no such session")
    return 0


def _stats(args) -> int:
    from serve.stats_tables import as_json, server_table

    stats = _client(args).stats()
    print(as_json(stats) if args.json else server_table(stats))
    return 0


def _demo(args) -> int:
    from serve.demo import run_demo

    run_demo(turns=args.turns)
    return 0


def _replay(args) -> int:
    import json

    from jattn.bench.replay import check_block_alignment, replay, round_robin, \
        run_in_process, run_over_grpc
    from jattn.bench.trace import load_trace

    if args.server and args.store == "off":
        raise SystemExit("jattn bench replay --store off runs in process (a server's "
                         "store is its own configuration)")
    if args.server and args.vocab_size is None:
        raise SystemExit("jattn bench replay --server needs --vocab-size (the served "
                         "model's)")
    if not args.server:
        try:
            check_block_alignment(args.scale, args.block_size)
        except ValueError as error:
            raise SystemExit(f"jattn bench replay: {error}") from None
    requests = load_trace(args.trace, scale=args.scale, limit=args.limit)
    if args.server:
        servers = args.server.split(",")
        runners = [run_over_grpc(_client(argparse.Namespace(**{**vars(args), "server": s})))
                   for s in servers]
        summary = replay(requests, round_robin(runners), vocab_size=args.vocab_size,
                         speedup=args.speedup, max_workers=args.max_workers,
                         kv_block_tokens=args.block_size)
    else:
        from jattn import LLM
        from jattn.compile_cache import use_compilation_cache
        from jattn.engine import EngineLimits
        from jattn.store import StoreConfig

        use_compilation_cache(args.compilation_cache_dir)
        store = (StoreConfig.sized_for_machine(block_size=args.block_size, hbm_bytes=1 << 30)
                 if args.store == "on" else None)
        llm = LLM(args.model, random_weights=args.random_weights, store=store,
                  block_size=args.block_size, num_blocks=args.num_blocks,
                  max_running=args.max_running)
        engine = llm.start_engine(EngineLimits(max_running=args.max_running,
                                               max_queue=max(len(requests), 1)),
                                  warm_up=args.warm_up)
        # The replay measures a server past its warm-up: the shapes compiled in the
        # background would otherwise take a core from the trace's first minutes.
        _freeze_long_lived_objects(llm)
        summary = replay(requests, run_in_process(engine), vocab_size=llm.config.vocab_size,
                         speedup=args.speedup, max_workers=args.max_workers,
                         kv_block_tokens=args.block_size)
        counters = engine.stats()  # how full the steps were: TPOT grows with the batch
        summary["engine"] = {name: counters.get(name, 0) for name in (
            "model_steps", "prefill_steps", "tokens_generated", "tokens_prefilled")}
        engine.shutdown()
    summary.update(trace=args.trace, scale=args.scale, limit=args.limit, store=args.store,
                   server=args.server, speedup=args.speedup, model=args.model)
    print(json.dumps(summary, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0


def _simulate(args) -> int:
    import json

    from jattn.bench.simulate import Machine, simulate
    from jattn.bench.trace import load_trace
    from jattn.model.config import ModelConfig
    from serve.config import parse_bytes

    directory = args.model if os.path.isdir(args.model) else os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "models",
        args.model)
    kv_bytes_per_token = ModelConfig.from_dir(directory).kv_bytes_per_token(args.kv_dtype_bytes)
    machine = Machine(
        hbm_bytes=parse_bytes(args.hbm_bytes), host_bytes=parse_bytes(args.host_bytes),
        disk_bytes=parse_bytes(args.disk_bytes), remote_bytes=parse_bytes(args.remote_bytes),
        hbm_bytes_per_s=args.hbm_gbps * 1e9, host_bytes_per_s=args.host_gbps * 1e9,
        disk_bytes_per_s=args.disk_gbps * 1e9, remote_bytes_per_s=args.remote_gbps * 1e9,
        prefill_tokens_per_s=args.prefill_tokens_per_s)
    result = simulate(load_trace(args.trace, limit=args.limit), machine,
                      kv_bytes_per_token=kv_bytes_per_token, policy=args.policy,
                      lookahead=args.lookahead)
    result.update(trace=args.trace, model=args.model, kv_bytes_per_token=kv_bytes_per_token,
                  machine=vars(machine))
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:  # its flags are ServeConfig's, which the client commands skip
        return serve_main(argv[1:])
    parser = argparse.ArgumentParser(prog="jattn", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="serve a model over gRPC (as jattn-serve; "
                        "jattn serve --help lists its flags)")
    for name, run, help_text in (("chat", _chat, "talk to a server, turn by turn"),
                                 ("describe", _describe, "what a server holds for a session"),
                                 ("end", _end, "forget a session on a server"),
                                 ("stats", _stats, "a server's statistics")):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("--server", default="127.0.0.1:50051",
                             help="host:port (gRPC), or http[s]://host:port for chat over "
                                  "the OpenAI API")
        command.add_argument("--token", help="bearer token (default: $JATTN_TOKEN)")
        command.add_argument("--tls-ca", help="PEM file of the CA that signed the server")
        command.set_defaults(run=run)
        if name == "chat":
            command.add_argument("--session", help="session id (default: a new one)")
            command.add_argument("--max-tokens", type=int, default=128)
            command.add_argument("--temperature", type=float, default=0.0)
        elif name in ("describe", "end"):
            command.add_argument("session_id")
        if name in ("describe", "stats"):
            command.add_argument("--json", action="store_true",
                                 help="print JSON (fields as in the gRPC API) instead of a "
                                      "table")
    bench = commands.add_parser("bench", help="replay a trace or simulate the store")
    benches = bench.add_subparsers(dest="bench", required=True)
    replay = benches.add_parser("replay", help="replay a Mooncake-format trace")
    replay.add_argument("--trace", required=True, help="JSONL: timestamp, input_length, "
                        "output_length, hash_ids")
    replay.add_argument("--scale", type=float, default=1.0,
                        help="shrink lengths and the 512-token block by this factor (in "
                        "process, 512 * scale must be a multiple of --block-size)")
    replay.add_argument("--limit", type=int, default=None, help="first N requests only")
    replay.add_argument("--store", choices=("on", "off"), default="on",
                        help="in process: on reuses KV by content across requests; off "
                        "builds the model with no store, so every request prefills its "
                        "whole prompt (the baseline without reuse)")
    replay.add_argument("--speedup", type=float, default=1.0,
                        help="divide the trace's timestamps by this")
    replay.add_argument("--server", default=None,
                        help="host:port of a jattn-serve (several, comma-separated: round "
                             "robin over them; default: run the model in this process)")
    replay.add_argument("--token", help="bearer token for --server")
    replay.add_argument("--tls-ca", help="PEM CA file for --server")
    replay.add_argument("--vocab-size", type=int, default=None,
                        help="with --server: the served model's vocabulary size")
    replay.add_argument("--model", default=None, help="in process: model directory "
                        "(default: the embedded stories260K)")
    replay.add_argument("--random-weights", action="store_true")
    replay.add_argument("--num-blocks", type=int, default=4096)
    replay.add_argument("--max-running", type=int, default=32)
    replay.add_argument("--max-workers", type=int, default=64,
                        help="client threads: requests in flight at most")
    replay.add_argument("--block-size", type=int, default=16,
                        help="KV block size in tokens: in process the engine's; with "
                        "--server, the server's (for the reuse the trace allows)")
    replay.add_argument("--warm-up", action=argparse.BooleanOptionalAction, default=True,
                        help="in process: compile every shape before replaying")
    replay.add_argument("--compilation-cache-dir", default="~/.cache/jattn/xla")
    replay.add_argument("--json", default=None, help="write the summary here")
    replay.set_defaults(run=_replay)
    simulate = benches.add_parser("simulate", help="the store's placement on a trace, "
                                  "at full size, without a model")
    simulate.add_argument("--trace", required=True)
    simulate.add_argument("--hbm-bytes", required=True, help="e.g. 16GiB")
    simulate.add_argument("--host-bytes", required=True)
    simulate.add_argument("--disk-bytes", required=True)
    simulate.add_argument("--remote-bytes", default="0", help="a Redis shared by replicas")
    simulate.add_argument("--policy", choices=("lru", "scheduler"), default="scheduler")
    simulate.add_argument("--lookahead", type=int, default=16)
    simulate.add_argument("--model", default="llama-3.2-1b",
                          help="a directory, or a shape under configs/models")
    simulate.add_argument("--kv-dtype-bytes", type=int, default=2)
    simulate.add_argument("--hbm-gbps", type=float, default=1000.0)
    simulate.add_argument("--host-gbps", type=float, default=25.0)
    simulate.add_argument("--disk-gbps", type=float, default=5.0)
    simulate.add_argument("--remote-gbps", type=float, default=1.25,
                          help="the remote tier's load bandwidth (1.25 GB/s: 10 Gb/s)")
    simulate.add_argument("--prefill-tokens-per-s", type=float, default=10_000.0)
    simulate.add_argument("--limit", type=int, default=None)
    simulate.add_argument("--json", default=None)
    simulate.set_defaults(run=_simulate)
    demo = commands.add_parser("demo", help="a scripted conversation over gRPC, reuse on and off")
    demo.add_argument("--turns", type=int, default=6)
    demo.set_defaults(run=_demo)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except grpc.RpcError as error:
        print(f"jattn: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""The `jattn-serve` and `jattn` commands.

    jattn-serve [--config configs/serve/default.yaml] [--port 50051] ...
    jattn serve ...                      the same
    jattn chat [--server ADDR] [--session ID]   an interactive conversation
    jattn describe ID | end ID | stats   one call each
    jattn demo                           a scripted conversation, reuse on against off
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
from serve.config import add_arguments, from_arguments


def serve_main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="jattn-serve", description="Serve a model over gRPC.")
    add_arguments(parser)
    return _serve(parser.parse_args(argv))


def _serve(args) -> int:
    from serve.server import Server  # loads jax: only when serving

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    server = Server(from_arguments(args)).start()
    print(f"jattn-serve listening on {server.config.host}:{server.port}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    print("jattn-serve: stopping (finishing turns in flight, flushing the store)", flush=True)
    server.stop()
    return 0


def _client(args) -> Client:
    tls_ca = None
    if args.tls_ca:
        with open(args.tls_ca, "rb") as f:
            tls_ca = f.read()
    return Client(args.server, token=args.token or os.environ.get("JATTN_TOKEN"),
                  tls_ca=tls_ca)


def _chat(args) -> int:
    client = _client(args)
    session = args.session or uuid.uuid4().hex[:12]
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
        for event in client.chat_events(session, message, max_tokens=args.max_tokens,
                                        temperature=args.temperature):
            facts = event.facts if event.HasField("facts") else facts
            print(event.text, end="", flush=True)
        if facts is not None:
            tiers = ", ".join(f"{k} {v}" for k, v in sorted(facts.tier_blocks.items())) or "-"
            print(f"\n  [ttft {facts.ttft_s * 1e3:.0f} ms, {facts.cached_tokens} tokens "
                  f"reused (blocks: {tiers}), {facts.recomputed_tokens} computed]")
    return 0


def _describe(args) -> int:
    print(_client(args).describe(args.session_id))
    return 0


def _end(args) -> int:
    existed = _client(args).end_session(args.session_id)
    print("ended" if existed else "no such session")
    return 0


def _stats(args) -> int:
    print(_client(args).stats())
    return 0


def _demo(args) -> int:
    from serve.demo import run_demo

    run_demo(turns=args.turns)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="jattn", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve a model over gRPC (as jattn-serve)")
    add_arguments(serve)
    serve.set_defaults(run=_serve)
    for name, run, help_text in (("chat", _chat, "talk to a server, turn by turn"),
                                 ("describe", _describe, "what a server holds for a session"),
                                 ("end", _end, "forget a session on a server"),
                                 ("stats", _stats, "a server's statistics")):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("--server", default="127.0.0.1:50051", help="host:port")
        command.add_argument("--token", help="bearer token (default: $JATTN_TOKEN)")
        command.add_argument("--tls-ca", help="PEM file of the CA that signed the server")
        command.set_defaults(run=run)
        if name == "chat":
            command.add_argument("--session", help="session id (default: a new one)")
            command.add_argument("--max-tokens", type=int, default=128)
            command.add_argument("--temperature", type=float, default=0.0)
        elif name in ("describe", "end"):
            command.add_argument("session_id")
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

"""Several processes, one mesh: jax's multi-controller runtime for DistAttention.

Every process of the group runs the same jitted steps over one mesh spanning all their
devices (the KV pool sharded over it, each process holding its own devices' blocks).
Process 0, the leader, schedules; before each step it sends the step to the others, the
followers, through `StepChannel` (a jax collective) — a `StepPlan`, or a small dataclass
for a warm-up or a store step — and they run the same step. A follower that dies makes the leader's next collective fail; one that hangs stops
it, which `StepWatchdog` turns into a clean exit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import threading
import time
import types
import typing
from dataclasses import dataclass
from typing import Callable

import jax
import numpy as np

from jattn.model.kv_cache import bucket

log = logging.getLogger("jattn.distributed")

COMPILE_TIMEOUT_FACTOR = 10
"""A warm-up step that compiles may take this many times the step timeout."""

GROUP_FAILED_EXIT = 3
"""The exit status of a process whose group failed (a peer died or hung)."""


def initialize(coordinator: str | None, num_processes: int | None = None,
               process_id: int | None = None, *, step_timeout_s: float = 60.0) -> None:
    """Joins this process to the group; call it before any other jax call.

    `coordinator` is process 0's `HOST:PORT` (with `num_processes` and this
    `process_id`), or "auto" to let jax discover all three (Cloud TPU, SLURM, Open MPI).
    On CPU the collectives go over gloo (TCP). jax's own heartbeat ends a process whose
    peer stopped answering after twice `step_timeout_s`, a backstop behind
    `StepWatchdog`.
    """
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator == "auto":
        jax.distributed.initialize(heartbeat_timeout_seconds=int(2 * step_timeout_s))
        return
    if num_processes is None or process_id is None or not 0 <= process_id < num_processes:
        raise ValueError(f"a process group needs num_processes >= 1 and a process_id in "
                         f"[0, num_processes), got {num_processes} and {process_id}")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id,
                               heartbeat_timeout_seconds=int(2 * step_timeout_s))


def is_leader() -> bool:
    """Whether this process schedules the group's steps (process 0)."""
    return jax.process_index() == 0


@dataclass(frozen=True)
class Stop:
    """The leader's last message: the followers' `follow` loops return."""


def to_plain(message):
    """A message (a dataclass) as JSON-able data: each dataclass a dict of its fields,
    bytes as hex, tuples and lists as lists."""
    if dataclasses.is_dataclass(message):
        return {f.name: to_plain(getattr(message, f.name))
                for f in dataclasses.fields(message)}
    if isinstance(message, bytes):
        return message.hex()
    if isinstance(message, (tuple, list)):
        return [to_plain(item) for item in message]
    if isinstance(message, np.generic):
        return message.item()
    return message


@functools.cache
def _field_types(kind: type) -> dict[str, type]:
    """A dataclass's fields' types, its annotations resolved (once per class)."""
    return typing.get_type_hints(kind)


def from_plain(data, kind):
    """The value of type `kind` that `to_plain` made `data` of, read by `kind`'s
    annotations: dataclasses, bytes, `tuple[X, ...]`, `X | None` and JSON's own types."""
    if dataclasses.is_dataclass(kind):
        hints = _field_types(kind)
        return kind(**{name: from_plain(value, hints[name]) for name, value in data.items()})
    if kind is bytes:
        return bytes.fromhex(data)
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is tuple:
        return tuple(from_plain(item, args[0]) for item in data)
    if origin in (typing.Union, types.UnionType):
        if data is None:
            return None
        (inner,) = [arg for arg in args if arg is not type(None)]
        return from_plain(data, inner)
    return data


class StepChannel:
    """The leader's messages to the followers, in order: frozen dataclasses, sent as the
    JSON of their type's name and fields (`to_plain`) and rebuilt from the types the
    receiver knows.

    Every process must call, in the same order, `send` (the leader) or `receive` (the
    others): each is one `broadcast_one_to_all` of a `FRAME_BYTES` frame (the message's
    length, then its first bytes) and, for a longer message, one more of the rest padded
    to a power of two, so a few shapes are ever compiled.
    """

    FRAME_BYTES = 4096
    _LENGTH_BYTES = 4

    def send(self, message) -> None:
        data = json.dumps({"type": type(message).__name__, "fields": to_plain(message)},
                          separators=(",", ":")).encode()
        frame = np.zeros(self.FRAME_BYTES, np.uint8)
        frame[:self._LENGTH_BYTES] = np.frombuffer(
            len(data).to_bytes(self._LENGTH_BYTES, "little"), np.uint8)
        head = data[:self.FRAME_BYTES - self._LENGTH_BYTES]
        frame[self._LENGTH_BYTES:self._LENGTH_BYTES + len(head)] = np.frombuffer(head, np.uint8)
        self._broadcast(frame)
        rest = data[len(head):]
        if rest:
            padded = np.zeros(bucket(len(rest), minimum=1), np.uint8)
            padded[:len(rest)] = np.frombuffer(rest, np.uint8)
            self._broadcast(padded)

    def receive(self, kinds: typing.Iterable[type]):
        """The next message: one of the dataclasses `kinds`, or `Stop`. A type the
        receiver does not know raises ValueError."""
        frame = self._broadcast(np.zeros(self.FRAME_BYTES, np.uint8))
        length = int.from_bytes(frame[:self._LENGTH_BYTES].tobytes(), "little")
        data = frame[self._LENGTH_BYTES:self._LENGTH_BYTES + length].tobytes()
        if length > len(data):
            rest = length - len(data)
            data += self._broadcast(np.zeros(bucket(rest, minimum=1), np.uint8))[:rest].tobytes()
        message = json.loads(data)
        known = {kind.__name__: kind for kind in (*kinds, Stop)}
        if message["type"] not in known:
            raise ValueError(f"the group's leader sent an unknown step {message['type']!r}")
        return from_plain(message["fields"], known[message["type"]])

    @staticmethod
    def _broadcast(array):
        from jax.experimental import multihost_utils

        return jax.tree.map(np.asarray, multihost_utils.broadcast_one_to_all(array))


class StepWatchdog:
    """Calls `on_stall(message)` once if a step runs past `timeout_s` seconds.

    A collective blocked on a peer that hangs cannot be interrupted, so the default
    `on_stall` logs and ends the process with `GROUP_FAILED_EXIT`; a server passes one
    that reports NOT_SERVING first.
    """

    def __init__(self, timeout_s: float, on_stall: Callable[[str], None] | None = None):
        if timeout_s <= 0:
            raise ValueError(f"step_timeout_s must be > 0, got {timeout_s}")
        self.timeout_s = timeout_s
        self.on_stall = on_stall or exit_group
        self._started: float | None = None
        self._what = ""
        self._limit_s = timeout_s
        self._lock = threading.Lock()
        threading.Thread(target=self._watch, name="jattn-step-watchdog", daemon=True).start()

    @contextlib.contextmanager
    def step(self, what: str, *, limit_s: float | None = None):
        """Times the step run inside it, against `limit_s` seconds (default
        `timeout_s`); `what` names it in the message."""
        with self._lock:
            self._started, self._what = time.monotonic(), what
            self._limit_s = limit_s or self.timeout_s
        try:
            yield
        finally:
            with self._lock:
                self._started = None

    def _watch(self) -> None:
        while True:
            time.sleep(min(0.5, self.timeout_s / 4))
            with self._lock:
                started, what, limit_s = self._started, self._what, self._limit_s
            if started is not None and time.monotonic() - started > limit_s:
                self.on_stall(f"the process group's step {what!r} has not finished after "
                              f"{limit_s:g} s: a process of the group hangs or died")
                return


class GroupLeader:
    """The leader's side of the group: `step(message)` sends a step to the followers
    and times it until its results are ready. A step that fails (a collective with a
    dead peer raises) or outlives `watchdog.timeout_s` ends the group through
    `on_failure(message)` (default `exit_group`): the followers cannot be trusted to be
    in step any more."""

    def __init__(self, channel: StepChannel, timeout_s: float,
                 on_failure: Callable[[str], None] | None = None):
        self.channel = channel
        self.on_failure = on_failure or exit_group
        self.watchdog = StepWatchdog(timeout_s, self.on_failure)

    @contextlib.contextmanager
    def step(self, message, *, compiles: bool = False):
        """Around one step: sends `message` (a dataclass) to the followers first. A
        warm-up step that `compiles` gets `COMPILE_TIMEOUT_FACTOR` times the time
        limit: compiling a model's shapes takes far longer than running one."""
        name = type(message).__name__
        limit_s = self.watchdog.timeout_s * (COMPILE_TIMEOUT_FACTOR if compiles else 1)
        with self.watchdog.step(name, limit_s=limit_s):
            try:
                self.channel.send(message)
                yield
            except Exception as error:
                self.on_failure(f"the process group's step {name!r} failed ({error}): a "
                                "process of the group died")
                raise

    def stop(self) -> None:
        """Ends the followers' `follow` loops (they return)."""
        self.channel.send(Stop())


def follow(steps: dict[type, Callable], channel: StepChannel) -> None:
    """A follower's life: runs each step the leader sends, `steps[type(message)](message)`
    (this process's share of it), until the leader stops; a failed collective (the
    leader died) raises."""
    while True:
        message = channel.receive(steps)
        if isinstance(message, Stop):
            return
        steps[type(message)](message)


def exit_group(message: str) -> None:
    """Logs `message` and ends this process at once with `GROUP_FAILED_EXIT` (threads
    blocked in a collective cannot be joined)."""
    log.critical("%s; exiting with status %d", message, GROUP_FAILED_EXIT)
    logging.shutdown()
    os._exit(GROUP_FAILED_EXIT)

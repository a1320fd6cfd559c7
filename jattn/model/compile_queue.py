"""`CompileQueue`: compilations that run after a server starts answering, one after
another, on a thread of their own."""

from __future__ import annotations

import atexit
import concurrent.futures
import logging
import queue
import threading
import time
from typing import Callable

log = logging.getLogger("jattn.model")

THREAD_NAME = "jattn-compile"
"""The name of the queue's thread (its compilations log under it)."""


class CompileQueue:
    """Runs compile jobs (functions of no argument) in the order submitted, one at a
    time, on a daemon thread named `THREAD_NAME`, so that a server answers while the
    shapes its first requests do not need compile. A job that raises is logged and its
    future holds the error; the jobs after it still run. Each time the queue runs dry it
    logs "background compilation done" with the jobs run and the seconds since it was
    made. `close` (also called at interpreter exit) cancels what is queued and waits for
    the job running: a process that exits in the middle of an XLA compilation on another
    thread aborts."""

    def __init__(self):
        self._jobs: queue.Queue = queue.Queue()
        self._futures: list[concurrent.futures.Future] = []
        self._running = threading.Lock()  # held while a job runs
        self._closed = False
        self._made = time.perf_counter()
        self._done = 0
        threading.Thread(target=self._run, name=THREAD_NAME, daemon=True).start()
        atexit.register(self.close)

    def submit(self, job: Callable[[], object], name: str) -> concurrent.futures.Future:
        """Queues `job` (`name` says what it compiles, in the log); the future resolves
        to its result once it ran (cancelled if the queue closes first)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._futures.append(future)
        self._jobs.put((job, name, future))
        return future

    def wait(self, timeout: float | None = None) -> bool:
        """Waits up to `timeout` seconds (None: as long as it takes) for every job
        submitted so far; True once none is left (run, or cancelled by `close`).
        Raises the error of the first that failed."""
        done, pending = concurrent.futures.wait(list(self._futures), timeout)
        for future in self._futures:
            if future in done and not future.cancelled() and future.exception() is not None:
                raise future.exception()
        return not pending

    def close(self) -> None:
        """Runs no more jobs: cancels those queued, waits for the one running."""
        self._closed = True
        while True:
            try:
                _, _, future = self._jobs.get_nowait()
            except queue.Empty:
                break
            future.cancel()
        with self._running:
            pass

    def _run(self) -> None:
        while True:
            job, name, future = self._jobs.get()
            with self._running:
                if self._closed or not future.set_running_or_notify_cancel():
                    future.cancel()
                    continue
                try:
                    future.set_result(job())
                except BaseException as error:  # noqa: BLE001 - kept in the future, logged
                    log.exception("background compilation of %s failed", name)
                    future.set_exception(error)
                self._done += 1
                if self._jobs.empty():
                    log.info("background compilation done: %d jobs in %.1f s", self._done,
                             time.perf_counter() - self._made)

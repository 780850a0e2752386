"""Collectors under deadlines: one that hangs or raises costs its own results, nothing else.

Each collector runs in a pool thread. A round starts every collector that is due and not
still running from an earlier round, then waits for each until its own deadline. A thread
cannot be killed, so a hung collector keeps its thread; it is not started again until it
returns, and reports failure meanwhile. The pool has one thread per collector, so a hung
one never starves the others.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from stellarbase.db import one_line


@dataclass(frozen=True)
class Collector:
    name: str
    collect: Callable[[], Any]
    deadline: float  # seconds
    every: float = 0.0  # run at most this often (0: every round)


@dataclass(frozen=True)
class Outcome:
    """A collector's last run: its value when ok, why not otherwise."""

    ok: bool
    seconds: float
    value: Any = None
    error: str = ""
    finished: float = 0.0  # monotonic


class Runner:
    def __init__(
        self, collectors: Sequence[Collector], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.collectors = list(collectors)
        self.clock = clock
        self.outcomes: dict[str, Outcome] = {}
        self._pool = ThreadPoolExecutor(
            max_workers=max(1, len(self.collectors)), thread_name_prefix="collector"
        )
        self._running: dict[str, tuple[Future[Any], float]] = {}  # name → (future, started)

    def round(self, tick: Callable[[], None] = lambda: None, tick_every: float = 1.0) -> None:
        """Run the due collectors; `tick` is called at least every `tick_every` seconds
        while waiting (the watchdog ping: the loop is alive, only a collector is slow)."""
        now = self.clock()
        waiting: dict[Future[Any], tuple[Collector, float]] = {}
        for c in self.collectors:
            running = self._running.get(c.name)
            if running is not None:
                future, started = running
                if not future.done():
                    self.outcomes[c.name] = Outcome(
                        False, now - started, error=f"still running after {now - started:.1f}s"
                    )
                    continue
                del self._running[c.name]
            last = self.outcomes.get(c.name)
            if last is not None and last.ok and c.every and now - last.finished < c.every:
                continue
            future = self._pool.submit(c.collect)
            self._running[c.name] = (future, now)
            waiting[future] = (c, now + c.deadline)
        while waiting:
            now = self.clock()
            for future in [f for f in waiting if f.done()]:
                c, _ = waiting.pop(future)
                self._finish(c, future)
            for future, (c, deadline) in list(waiting.items()):
                if now >= deadline:
                    del waiting[future]
                    started = self._running[c.name][1]
                    self.outcomes[c.name] = Outcome(
                        False, now - started, error=f"timed out after {c.deadline:g}s"
                    )
            if not waiting:
                break
            first = min(deadline for _, deadline in waiting.values())
            wait(
                waiting, timeout=max(0.0, min(first - now, tick_every)), return_when=FIRST_COMPLETED
            )
            tick()

    def _finish(self, c: Collector, future: Future[Any]) -> None:
        started = self._running.pop(c.name)[1]
        now = self.clock()
        exc = future.exception()
        if exc is not None:
            self.outcomes[c.name] = Outcome(False, now - started, error=one_line(exc), finished=now)
        else:
            self.outcomes[c.name] = Outcome(True, now - started, future.result(), finished=now)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

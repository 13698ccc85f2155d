"""What a person sees: a few lines per stage and one progress line (rows, steps or trials) with its rate
and ETA, redrawn in place on a terminal and printed now and then elsewhere (job logs, CI). Ray's own
progress blocks, deprecation notes and the workers' output reach the console only with `--verbose`
(RANKRAY_VERBOSE=1); they stay in Ray's log files either way (the dashboard's logs pages)."""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

import ray

VERBOSE_ENV = "RANKRAY_VERBOSE"
PRINT_EVERY_S = 30.0  # without a terminal: one progress line at most this often (plus the last)
REDRAW_EVERY_S = 0.2  # on a terminal


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0", "false")


class _NotAboutBars(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Progress bars disabled")


def quiet_ray() -> None:
    """Keep Ray Data's per-dataset progress blocks and execution notes off the console unless verbose;
    its warnings stay, and its file handler keeps writing ray-data.log in the session's log directory."""
    if verbose():
        return
    import ray.data  # here, not at the top: the ProgressBoard actor's process imports this module

    ray.data.DataContext.get_current().enable_progress_bars = False
    for h in logging.getLogger("ray.data").handlers:
        if h.get_name() == "console":
            h.setLevel(logging.WARNING)
            if not any(isinstance(f, _NotAboutBars) for f in h.filters):
                h.addFilter(_NotAboutBars())


def say(msg: str) -> None:
    print(msg, flush=True)


def _duration(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


class Bar:
    """One progress line: `label [####......] done/total unit  note  ETA`."""

    def __init__(self, label: str, total: float, unit: str) -> None:
        self.label, self.total, self.unit = label, total, unit
        self.t0 = time.time()
        self.last = 0.0

    @property
    def stream(self) -> TextIO:  # looked up at each use: a bar can be pickled (e.g. in a Tune callback)
        return sys.stdout

    @property
    def tty(self) -> bool:
        return self.stream.isatty()

    def line(self, done: float, note: str = "", rate: float | None = None) -> str:
        """`rate` (units per second) gives the ETA; by default the average since the bar started."""
        frac = min(max(done / self.total, 0.0), 1.0) if self.total > 0 else 0.0
        filled = int(round(20 * frac))
        rate = rate if rate is not None else done / max(time.time() - self.t0, 1e-9)
        eta = f"ETA {_duration((self.total - done) / rate)}" if 0 < done < self.total and rate > 0 else ""
        shown = f"{done:,.0f}" if float(done).is_integer() else f"{done:,.1f}"
        parts = [f"{self.label} [{'#' * filled}{'.' * (20 - filled)}] {shown}/{self.total:,.0f} {self.unit}",
                 note, eta]
        return "  ".join(p for p in parts if p)

    def update(self, done: float, note: str = "", rate: float | None = None) -> None:
        now = time.time()
        if now - self.last < (REDRAW_EVERY_S if self.tty else PRINT_EVERY_S):
            return
        if not self.tty and now - self.t0 < PRINT_EVERY_S:  # no line for work that ends within the interval
            return
        self.last = now
        text = self.line(done, note, rate)
        if self.tty:
            self.stream.write("\r\x1b[2K" + text)
            self.stream.flush()
        else:
            print(text, file=self.stream, flush=True)

    def close(self, summary: str) -> None:
        """Replace the bar by its final lines."""
        if self.tty and self.last:
            self.stream.write("\r\x1b[2K")
        if summary:
            print(summary, file=self.stream, flush=True)


@contextmanager
def step(label: str) -> Iterator[dict[str, Any]]:
    """One line for a blocking stage (a Ray Data pass): on a terminal its elapsed time counts up while it
    runs; when it ends, `label: <what the body left in ['done']> in N s`."""
    out: dict[str, Any] = {"done": "done"}
    t0, stop = time.time(), threading.Event()

    def tick() -> None:
        while not stop.wait(0.5):
            sys.stdout.write(f"\r\x1b[2K{label} ... {_duration(time.time() - t0)}")
            sys.stdout.flush()

    th = threading.Thread(target=tick, daemon=True) if sys.stdout.isatty() else None
    if th:
        th.start()
    try:
        yield out
    finally:
        stop.set()
        if th:
            th.join()
            sys.stdout.write("\r\x1b[2K")
    say(f"{label}: {out['done']} in {_duration(time.time() - t0)}")


@ray.remote(num_cpus=0)
class ProgressBoard:
    """Where a Train run's rank 0 leaves its progress (fire and forget) for the driver to draw."""

    def __init__(self) -> None:
        self.state: dict[str, Any] = {}

    def put(self, state: dict[str, Any]) -> None:
        self.state = state

    def get(self) -> dict[str, Any]:
        return self.state


@contextmanager
def watch(board: Any, render: Callable[[dict[str, Any]], None], every_s: float = 0.5) -> Iterator[None]:
    """Poll `board` in a thread while the body runs and hand each new state to `render`."""
    stop = threading.Event()

    def poll() -> None:
        seen: dict[str, Any] = {}
        while not stop.wait(every_s):
            try:
                state = ray.get(board.get.remote(), timeout=10)
            except (ray.exceptions.RayError, TimeoutError):
                continue
            if state and state != seen:
                seen = state
                render(state)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    try:
        yield
    finally:
        stop.set()
        th.join()

"""A one-line live progress bar on stderr (no tqdm needed): done, errors, in flight, elapsed."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, label: str = "replay", enabled: bool = True, stream=None):
        self.total, self.label, self.enabled = total, label, enabled
        self.stream = stream or sys.stderr
        self.done = self.errors = self.in_flight = 0
        self._t0 = time.perf_counter()
        self._last_draw = 0.0
        self._tty = getattr(self.stream, "isatty", lambda: False)()

    def started(self) -> None:
        self.in_flight += 1
        self._maybe_draw()

    def finished(self, ok: bool) -> None:
        self.in_flight -= 1
        self.done += 1
        self.errors += 0 if ok else 1
        self._maybe_draw()

    def line(self) -> str:
        width = 30
        filled = width * self.done // max(1, self.total)
        bar = "#" * filled + "." * (width - filled)
        return (f"{self.label} [{bar}] {self.done}/{self.total} done, {self.errors} errors, "
                f"{self.in_flight} in flight, {time.perf_counter() - self._t0:.1f}s")

    def _maybe_draw(self) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        # On a terminal redraw in place often; in a log file write a line every 10 s at most.
        if now - self._last_draw < (0.2 if self._tty else 10.0):
            return
        self._last_draw = now
        self.stream.write(("\r" + self.line()) if self._tty else self.line() + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write(("\r" + self.line() + "\n") if self._tty else self.line() + "\n")
            self.stream.flush()

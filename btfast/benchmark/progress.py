"""Live progress: one line per finished cell (its figure or why it was skipped), under a tqdm bar on a terminal
(what runs now, cells done, elapsed / left). Notes (what is being built, every skip and its reason) go above
the bar: nothing is skipped silently.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


class Progress:
    def __init__(self, total: int, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.total = total
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.done = 0
        self.t0 = time.perf_counter()
        self.bar: Any = None
        if enabled and total and getattr(self.stream, "isatty", lambda: False)():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, file=self.stream, unit="cell", dynamic_ncols=True, leave=True)
            except ImportError:
                self.bar = None

    def note(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def status(self, what: str) -> None:
        """What runs now: on the bar, or as a line of its own on a plain stream (a log shows every step that starts)."""
        if self.bar is not None:
            self.bar.set_description_str(what, refresh=True)
        elif self.enabled:
            print(f"  ... {what}", file=self.stream, flush=True)

    def advance(self, result: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        width = len(str(self.total))
        done = f"{self.done:>{width}}/{self.total}" if self.total else str(self.done)
        line = f"[{done} {time.perf_counter() - self.t0:6.0f}s] {result}"
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
            self.bar.update(1)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def duration(seconds: float) -> str:
    return f"{seconds:.3g} s" if seconds >= 1 else f"{seconds * 1e3:.3g} ms"


def short_error(e: BaseException) -> str:
    """An exception in one line: its type and the first line of its message."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"

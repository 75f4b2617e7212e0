"""Decode and preprocess images in worker processes, a few chunks ahead, so the model never waits on Pillow.

Workers return uint8 canvases (crop-sized, 3 bytes a pixel, 4× fewer than float32 through the pipe); the
lookup-table normalisation runs on the model's device. The pool uses `forkserver` (fork after torch has
started threads is unsafe; spawn re-imports everything per worker): the server imports this module once and
forks cheap workers from it. `workers=0` decodes in the calling process.
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing as mp
import os
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from btfast.preprocess import ImagePreprocessor

_PRE: ImagePreprocessor | None = None


def cpu_count() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_workers() -> int:
    """min(8, CPUs - 1): leave one core to the process driving the model."""
    return max(0, min(8, cpu_count() - 1))


def _init(pre: ImagePreprocessor) -> None:
    global _PRE
    _PRE = pre


def _load(source: Any) -> np.ndarray | str:
    return _PRE.load_or_reason(source)  # type: ignore[union-attr]


@contextlib.contextmanager
def _main_hidden() -> Iterator[None]:
    """Start workers without re-running the caller's `__main__` (forkserver and spawn children import it, so a script
    calling `score()` without a `__name__` guard would run again in each); they need only this module."""
    main = getattr(sys.modules.get("__main__"), "__dict__", {})
    saved = {k: main.pop(k) for k in ("__file__", "__spec__") if k in main}
    main["__spec__"] = None
    try:
        yield
    finally:
        main.update(saved)


class ImageLoader:
    """`submit(keys, sources)` now, `result(handle)` later → {key: canvas or reason}."""

    def __init__(self, pre: ImagePreprocessor, workers: int) -> None:
        self.pre, self.workers = pre, workers
        self.pool: Any = None
        self._starting: threading.Thread | None = None
        self._error: BaseException | None = None
        if workers > 0:
            # Starting the pool takes seconds (the server imports btfast); let it overlap loading the model.
            self._starting = threading.Thread(target=self._start, name="btfast-pool-start", daemon=True)
            self._starting.start()

    def _start(self) -> None:
        try:
            ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
            if ctx.get_start_method() == "forkserver":
                ctx.set_forkserver_preload(["btfast.score.loader"])
            with _main_hidden():
                self.pool = ctx.Pool(self.workers, initializer=_init, initargs=(self.pre,))
        except BaseException as e:  # reported by the first submit
            self._error = e

    def _ready(self) -> None:
        if self._starting is not None:
            self._starting.join()
            self._starting = None
            if self._error is not None:
                raise RuntimeError(f"cannot start image worker processes: {self._error}") from self._error

    def submit(self, keys: Sequence[str], sources: Sequence[Any]) -> tuple[list[str], Any]:
        if self.workers == 0:  # in this process, when the result is asked for (so `submit` never blocks)
            return list(keys), functools.partial(list, map(self.pre.load_or_reason, list(sources)))
        self._ready()
        chunksize = max(1, min(16, len(sources) // (4 * self.workers) or 1))
        return list(keys), self.pool.map_async(_load, sources, chunksize=chunksize).get

    def result(self, handle: tuple[list[str], Any]) -> dict[str, np.ndarray | str]:
        keys, get = handle
        return dict(zip(keys, get()))

    def close(self) -> None:
        with contextlib.suppress(RuntimeError):  # a pool that failed to start: nothing to close
            self._ready()
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None

    def __enter__(self) -> ImageLoader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

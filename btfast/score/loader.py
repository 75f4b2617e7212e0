"""Decode and preprocess images in worker processes, a few chunks ahead, so the model never waits on Pillow.

Workers return uint8 canvases (crop-sized, 3 bytes a pixel, 4× fewer than float32 through the pipe); the
lookup-table normalisation runs on the model's device. The pool uses `forkserver` (fork after torch has
started threads is unsafe; spawn re-imports everything per worker): the server imports this module once and
forks cheap workers from it. `workers=0` decodes in the calling process.
"""

from __future__ import annotations

import contextlib
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
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def default_workers() -> int:
    """min(8, CPUs - 1): leave one core to the process driving the model."""
    return max(0, min(8, cpu_count() - 1))


def _init(pre: ImagePreprocessor) -> None:
    global _PRE
    _PRE = pre


def _load(source: Any) -> np.ndarray | str:
    assert _PRE is not None
    return _PRE.load_or_reason(source)


@contextlib.contextmanager
def _main_hidden() -> Iterator[None]:
    """Start workers without re-running the caller's `__main__` in them.

    forkserver and spawn children import the parent's main script or module: a script calling `score()` without
    an `if __name__ == "__main__":` guard would run again in every worker (and start pools of its own). The
    workers need only this module, so the main module's file and spec are hidden while they start.
    """
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    missing = object()
    saved_file = main.__dict__.get("__file__", missing)
    saved_spec = main.__dict__.get("__spec__", missing)
    try:
        if saved_file is not missing:
            del main.__file__
        main.__spec__ = None
        yield
    finally:
        if saved_file is not missing:
            main.__file__ = saved_file  # type: ignore[assignment]
        if saved_spec is not missing:
            main.__spec__ = saved_spec  # type: ignore[assignment]


class ImageLoader:
    """`submit(keys, sources)` now, `result(handle)` later → {key: canvas or reason}."""

    def __init__(self, pre: ImagePreprocessor, workers: int) -> None:
        self.pre = pre
        self.workers = workers
        self.pool = None
        self._starting: threading.Thread | None = None
        self._error: BaseException | None = None
        if workers > 0:
            # Starting the pool takes seconds (the server imports btfast); let it overlap loading the model.
            self._starting = threading.Thread(target=self._start, name="btfast-pool-start", daemon=True)
            self._starting.start()

    def _start(self) -> None:
        try:
            methods = mp.get_all_start_methods()
            ctx = mp.get_context("forkserver" if "forkserver" in methods else "spawn")
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
        if self.workers == 0:
            return list(keys), _Lazy(self.pre, list(sources))
        self._ready()
        chunksize = max(1, min(16, len(sources) // (4 * self.workers) or 1))
        return list(keys), self.pool.map_async(_load, sources, chunksize=chunksize)

    def result(self, handle: tuple[list[str], Any]) -> dict[str, np.ndarray | str]:
        keys, res = handle
        return dict(zip(keys, res.get()))

    def close(self) -> None:
        if self._starting is not None:
            self._starting.join()
            self._starting = None
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None

    def __enter__(self) -> ImageLoader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _Lazy:
    """In-process loading, done when the result is asked for (so `submit` never blocks the pipeline)."""

    def __init__(self, pre: ImagePreprocessor, sources: list[Any]) -> None:
        self.pre, self.sources = pre, sources

    def get(self) -> list[Any]:
        global _PRE
        _PRE = self.pre
        return [_load(s) for s in self.sources]

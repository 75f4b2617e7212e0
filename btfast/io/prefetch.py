"""Read ahead: fetch the next items in a thread while the caller works on this one.

For shards: the next shard's bytes download (or come off disk) while this shard's images are decoded, so the
decoding workers do not wait on the store. Reading is I/O (sockets, file reads) and releases the GIL, so one
thread is enough; `depth` items are held beyond the current one (memory: about depth + 1 shards).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def read_ahead(items: Iterable[T], read: Callable[[T], R], depth: int = 1) -> Iterator[tuple[T, Future[R]]]:
    """(item, future of `read(item)`) in order; up to `depth` later reads run while the caller holds one.

    `future.result()` returns the read or raises its error, so one bad item costs that item only. Closing the
    iterator early cancels the reads not yet started and does not wait for the one running.
    """
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="btfast-read-ahead")
    pending: deque[tuple[T, Future[R]]] = deque()
    it = iter(items)
    try:
        while True:
            while len(pending) <= depth:
                item = next(it, _END)
                if item is _END:
                    break
                pending.append((item, pool.submit(read, item)))  # type: ignore[arg-type]
            if not pending:
                return
            yield pending.popleft()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


_END = object()

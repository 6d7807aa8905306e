"""Dynamic batching for `unembed serve`: items from many requests, decoded together.

Every image or vector of every request becomes one `Item` in a queue per (decoder, decoding options).
One worker thread takes the oldest queue's items, up to `max_batch` of them, and embeds and decodes
them together; each item's caption goes back to its own request through its future.

No item waits for a batch that cannot fill: when the thread is idle it takes what is queued at once
(a lone request is decoded alone, as fast as with `max_batch 1`); batches form from the requests
that arrive while a batch is being decoded. `max_wait_ms` > 0 restores the old trade: the oldest
item waits up to that long for a full batch.

Nothing a request does can stop the thread. An item whose request went away (its handler cancelled
by a client hang-up, a timeout or a middleware) is skipped when its batch is taken: the batcher
claims each future (`set_running_or_notify_cancel`) before decoding it, and never sets a result on
a future that is done. Any other error in the loop is logged and the loop goes on. Should the thread
stop all the same, `stopped` says why, the items still queued fail with 503, and so does every later
`submit` (and the server's /health).

The queue is bounded (`max_queue` items waiting): a request that does not fit whole is refused
whole with `QueueFull` (503 and a Retry-After estimate); nothing is accepted and then dropped.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field

import torch

from unembed.errors import RequestError

log = logging.getLogger(__name__)


class QueueFull(RequestError):
    """The queue cannot take a request whole: 503, with a Retry-After header (seconds)."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(503, message)
        self.headers = {"Retry-After": str(retry_after)}


@dataclass
class Item:
    payload: object              # a PIL image, or a vector [D]
    record: dict                 # the response record so far (file, image_id)
    future: Future = field(default_factory=Future)
    arrived: float = field(default_factory=time.monotonic)
    batch_size: int = 0          # how many items it was decoded with (0 until it is)


def _claim(future: Future) -> bool:
    """Marks a queued item's future as running, so that its request can no longer cancel it; False
    when the request already did (or the future is not pending: not ours to decode)."""
    try:
        return future.set_running_or_notify_cancel()
    except RuntimeError:
        return False


def _settle(future: Future, result=None, error: BaseException | None = None) -> None:
    """Sets a future's result or exception unless it is done already (cancelled by its request)."""
    if future.done():
        return
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:  # cancelled between the check and the set
        pass


class Batcher:
    """Queues of items per (decoder, options) and one thread that decodes them in batches."""

    def __init__(self, models, max_batch: int, max_wait_ms: float = 0.0, max_queue: int | None = None):
        self.models, self.max_batch, self.max_wait = models, max(1, max_batch), max(0.0, max_wait_ms) / 1000
        self.max_queue = max_queue or 4 * self.max_batch
        self.queues: dict[tuple, deque[Item]] = {}
        self.queued = 0               # items waiting (cancelled ones count until they are dropped)
        self.lock = threading.Condition()
        self.stats = {"batches": 0, "items": 0, "largest_batch": 0, "failed_items": 0, "decode_seconds": 0.0,
                      "cancelled_items": 0, "refused_requests": 0, "loop_errors": 0}
        self.closing = False
        self.stopped: str | None = None  # why the thread ended without being closed
        self.thread = threading.Thread(target=self._loop, name="unembed-batcher", daemon=True)
        self.thread.start()

    @property
    def alive(self) -> bool:
        return self.stopped is None and self.thread.is_alive()

    def health(self) -> str | None:
        """None while the batcher takes work; else why it does not (one sentence)."""
        if self.closing:
            return "the server is shutting down"
        if not self.alive:
            return f"the batching thread stopped ({self.stopped or 'unknown reason'}); restart the server"
        return None

    def submit(self, key: tuple, items: list[Item]) -> list[Future]:
        """Queues a request's items, all of them or none: RequestError 503 when shutting down or
        stopped, QueueFull when they do not fit under `max_queue`."""
        with self.lock:
            if (problem := self.health()) is not None:
                raise RequestError(503, problem)
            if self.queued + len(items) > self.max_queue:
                self._drop_cancelled()
            if self.queued + len(items) > self.max_queue:
                self.stats["refused_requests"] += 1
                raise QueueFull(f"the server is busy: {self.queued} items are waiting and {len(items)} more would "
                                f"pass the limit of {self.max_queue} (--max-queue); retry later", self._retry_after())
            self.queues.setdefault(key, deque()).extend(items)
            self.queued += len(items)
            self.lock.notify()
        return [item.future for item in items]

    def close(self) -> None:
        """Finish every queued item, then stop."""
        with self.lock:
            self.closing = True
            self.lock.notify()
        self.thread.join()

    def _drop_cancelled(self) -> None:
        """Removes the queued items whose requests went away (called with the lock held)."""
        for key, queue in list(self.queues.items()):
            live = deque(item for item in queue if not item.future.cancelled())
            self.stats["cancelled_items"] += len(queue) - len(live)
            self.queued -= len(queue) - len(live)
            if live:
                self.queues[key] = live
            else:
                del self.queues[key]

    def _retry_after(self) -> int:
        """Seconds until the queue has drained, from the decoding speed so far (at least 1)."""
        per_item = self.stats["decode_seconds"] / self.stats["items"] if self.stats["items"] else 1.0
        return max(1, math.ceil(self.queued * per_item))

    def _next_batch(self) -> tuple[tuple, list[Item]] | None:
        with self.lock:
            while True:
                waiting = [(q[0].arrived, key) for key, q in self.queues.items() if q]
                if not waiting:
                    if self.closing:
                        return None
                    self.lock.wait()
                    continue
                first, key = min(waiting, key=lambda waits: waits[0])  # the queue whose first item is oldest
                queue = self.queues[key]
                if self.max_wait and len(queue) < self.max_batch and not self.closing:  # max_wait_ms > 0 only
                    left = first + self.max_wait - time.monotonic()
                    if left > 0:  # the oldest item waits a while longer for a fuller batch
                        self.lock.wait(timeout=left)
                        continue
                batch = []
                while queue and len(batch) < self.max_batch:
                    item = queue.popleft()
                    self.queued -= 1
                    if _claim(item.future):
                        batch.append(item)
                    else:
                        self.stats["cancelled_items"] += 1
                if not queue:
                    del self.queues[key]
                if batch:
                    return key, batch

    def _loop(self) -> None:
        reason = "it returned"
        batch: list[Item] = []
        try:
            while True:
                batch = []
                try:
                    taken = self._next_batch()
                    if taken is None:
                        return
                    key, batch = taken
                    self._run(key, batch)
                except Exception as e:  # noqa: BLE001 - a bug here must not stop the server: log it, go on
                    self.stats["loop_errors"] += 1
                    log.exception("unembed serve: an unexpected error in the batching loop; it goes on")
                    for item in batch:
                        _settle(item.future, error=e)
                    if not batch:
                        time.sleep(0.1)  # an error taking a batch: do not spin on it
        except BaseException as e:
            reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            raise
        finally:
            with self.lock:
                if not self.closing:
                    self.stopped = reason
                    log.critical("unembed serve: the batching thread stopped (%s); requests now get 503", reason)
                left = [item for queue in self.queues.values() for item in queue] + batch
                self.queues.clear()
                self.queued = 0
            for item in left:
                _settle(item.future, error=RequestError(503, f"the batching thread stopped ({reason})"))

    def _run(self, key: tuple, batch: list[Item]) -> None:
        """Decodes a claimed batch and answers each item; if the batch fails, its items are decoded
        again one by one, so that only the item that fails gets the error."""
        self.stats["batches"] += 1
        self.stats["items"] += len(batch)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(batch))
        t0 = time.perf_counter()
        try:
            self._deliver(batch, self._decode(key, batch))
        except Exception as error:  # noqa: BLE001 - find the item that fails, decode the others
            if len(batch) == 1:
                self._fail(batch[0], error)
                return
            for item in batch:
                try:
                    self._deliver([item], self._decode(key, [item]))
                except Exception as e:  # noqa: BLE001
                    self._fail(item, e)
        finally:
            self.stats["decode_seconds"] = round(self.stats["decode_seconds"] + time.perf_counter() - t0, 3)

    def _fail(self, item: Item, error: Exception) -> None:
        self.stats["failed_items"] += 1
        _settle(item.future, error=error)

    @staticmethod
    def _deliver(batch: list[Item], results: list[dict]) -> None:
        if len(results) != len(batch):
            raise RuntimeError(f"{len(batch)} items decoded into {len(results)} captions")
        for item, result in zip(batch, results):
            item.batch_size = len(batch)
            _settle(item.future, result=result)

    def _decode(self, key: tuple, batch: list[Item]) -> list[dict]:
        from unembed.embedders import Embedded
        from unembed.pipeline import caption_batches

        name, kind, options = key
        _, decoder, embedder = self.models.get(name)
        ids = [str(item.record["image_id"]) for item in batch]
        t0 = time.perf_counter()
        if kind == "images":
            embedded = embedder.embed([item.payload for item in batch], ids, with_tokens=decoder.needs_tokens)
        else:
            embedded = Embedded(torch.stack([item.payload for item in batch]), ids, "", "", "image")
        records = [r for part in caption_batches([(embedded, None)], decoder, **dict(options)) for r in part]
        took = round(time.perf_counter() - t0, 4)
        return [{**item.record, "caption": record["caption"], "decoder": decoder.kind, "batch_seconds": took,
                 "batch_size": len(batch)} for item, record in zip(batch, records)]

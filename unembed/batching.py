"""Dynamic batching for `unembed serve`: items from many requests, decoded together.

Every image or vector of every request becomes one `Item` in a queue per (decoder, decoding options).
One worker thread takes the oldest queue's items, up to `max_batch` of them, and embeds and decodes
them together; each item's caption goes back to its own request through its future.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from unembed.errors import RequestError

@dataclass
class Item:
    payload: object              # a PIL image, or a vector [D]
    record: dict                 # the response record so far (file, image_id)
    future: Future = field(default_factory=Future)
    arrived: float = field(default_factory=time.monotonic)


class Batcher:
    """Queues of items per (decoder, options) and one thread that decodes them in batches."""

    def __init__(self, models: Models, max_batch: int, max_wait_ms: float):
        self.models, self.max_batch, self.max_wait = models, max_batch, max_wait_ms / 1000
        self.queues: dict[tuple, list[Item]] = {}
        self.lock = threading.Condition()
        self.stats = {"batches": 0, "items": 0, "largest_batch": 0, "failed_items": 0, "decode_seconds": 0.0}
        self.closing = False
        self.thread = threading.Thread(target=self._loop, name="unembed-batcher", daemon=True)
        self.thread.start()

    def submit(self, key: tuple, items: list[Item]) -> list[Future]:
        with self.lock:
            if self.closing:
                raise RequestError(503, "the server is shutting down")
            self.queues.setdefault(key, []).extend(items)
            self.lock.notify()
        return [item.future for item in items]

    def close(self) -> None:
        """Finish every queued item, then stop."""
        with self.lock:
            self.closing = True
            self.lock.notify()
        self.thread.join()

    def _next_batch(self) -> tuple[tuple, list[Item]] | None:
        with self.lock:
            while True:
                waiting = [(q[0].arrived, key) for key, q in self.queues.items() if q]
                if not waiting:
                    if self.closing:
                        return None
                    self.lock.wait()
                    continue
                first, key = min(waiting)
                queue = self.queues[key]
                left = first + self.max_wait - time.monotonic()
                if len(queue) >= self.max_batch or left <= 0 or self.closing:
                    batch, self.queues[key] = queue[:self.max_batch], queue[self.max_batch:]
                    return key, batch
                self.lock.wait(timeout=left)

    def _loop(self) -> None:
        while (taken := self._next_batch()) is not None:
            key, batch = taken
            self.stats["batches"] += 1
            self.stats["items"] += len(batch)
            self.stats["largest_batch"] = max(self.stats["largest_batch"], len(batch))
            t0 = time.perf_counter()
            try:
                self._decode(key, batch)
            except Exception:  # noqa: BLE001 - find the item that fails, decode the others
                for item in batch:
                    try:
                        self._decode(key, [item])
                    except Exception as e:  # noqa: BLE001
                        self.stats["failed_items"] += 1
                        item.future.set_exception(e)
            self.stats["decode_seconds"] = round(self.stats["decode_seconds"] + time.perf_counter() - t0, 3)

    def _decode(self, key: tuple, batch: list[Item]) -> None:
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
        per_item = round((time.perf_counter() - t0) / len(batch), 4)
        for item, record in zip(batch, records):
            item.future.set_result({**item.record, "caption": record["caption"], "decoder": decoder.kind,
                                    "seconds": per_item})

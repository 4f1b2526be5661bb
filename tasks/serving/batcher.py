"""The model's one worker thread and its bounded waiting line (dynamic batching).

Requests that arrive while the model is idle wait up to `window_s` for company (at most `max_batch`), then are prefilled
together; requests that arrive while a batch runs join it between two steps, as long as it has fewer than `max_batch`
rows. The rest wait in line, at most `max_waiting` of them behind a full batch: one more is refused at once
(`Overloaded`, answered 503), never left to wait without bound. The model runs on this one thread, so the server's
event loop stays free, and torch spends the cores on one batch at a time rather than on requests fighting for them.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections import Counter, deque

from tasks.serving.decode import Decoder, Event, Row

log = logging.getLogger("sftflow.serve")


class Overloaded(RuntimeError):
    """The waiting line is full: the request is refused now rather than queued without bound."""


class Batcher:
    """Feeds submitted Rows to a Decoder in shared batches on one thread; counts what it did for /health."""

    def __init__(self, decoder: Decoder, max_batch: int, max_waiting: int, window_s: float):
        self.decoder, self.max_batch, self.max_waiting, self.window_s = decoder, max_batch, max_waiting, window_s
        self.waiting: deque[Row] = deque()
        self.cond = threading.Condition()
        self.running = 0
        self.stopping = False
        # every key from the start: /health copies the counters while this thread adds to them
        self.stats = Counter(dict.fromkeys(("requests", "rejected", "cancelled", "completed", "failed", "prefills",
                                            "steps", "tokens"), 0))
        self.largest_batch = 0
        self.thread = threading.Thread(target=self.run, name="sftflow-model", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the worker after its current step; the requests still waiting are answered with an error."""
        with self.cond:
            self.stopping = True
            left, self.waiting = list(self.waiting), deque()
            self.cond.notify_all()
        for row in left:
            row.emit(Event(error="the server is shutting down"))
        self.thread.join(timeout_s)

    def submit(self, row: Row) -> None:
        """Queue `row` for the next batch with room, or raise Overloaded when `max_waiting` rows already wait."""
        with self.cond:
            # room: the batch's free rows (taken at its next step) and the line behind a full batch
            if self.stopping or len(self.waiting) >= self.max_batch - self.running + self.max_waiting:
                self.stats["rejected"] += 1
                raise Overloaded(f"{self.running} requests are being answered (--max-batch {self.max_batch}) and "
                                 f"{len(self.waiting)} wait (--max-waiting {self.max_waiting}); retry shortly")
            self.waiting.append(row)
            self.stats["requests"] += 1
            self.cond.notify()

    def take(self, running: int) -> list[Row]:
        """Return the rows to admit now: when idle, block for the first, then wait up to the window for more."""
        with self.cond:
            if running == 0:
                self.cond.wait_for(lambda: self.waiting or self.stopping)
                deadline = time.monotonic() + self.window_s
                while len(self.waiting) < self.max_batch and not self.stopping:
                    if (left := deadline - time.monotonic()) <= 0:
                        break
                    self.cond.wait(left)
            rows = [self.waiting.popleft() for _ in range(min(self.max_batch - running, len(self.waiting)))]
        gone = [r for r in rows if r.cancelled]
        self.stats["cancelled"] += len(gone)
        return [r for r in rows if not r.cancelled]

    def run(self) -> None:
        """The worker: admit, step, repeat, until stopped. A failed step fails its rows and the worker goes on."""
        import torch

        batch = None
        with torch.inference_mode():
            while not self.stopping:
                newcomers = self.take(len(batch.rows) if batch else 0)
                before = list(batch.rows) if batch else []
                try:
                    batch = self.decoder.advance(batch, newcomers)
                except Exception as e:  # noqa: BLE001 - answer these requests 500 and keep serving the next ones
                    log.error("generation failed:\n%s", traceback.format_exc())
                    for row in before + newcomers:
                        row.done = True
                        row.emit(Event(error=f"generation failed: {type(e).__name__}: {e}"))
                    self.stats["failed"] += len(before + newcomers)
                    batch, before, newcomers = None, [], []
                self.count(before, newcomers, batch)
        log.info("model worker stopped")

    def count(self, before: list[Row], newcomers: list[Row], batch) -> None:
        """Update the counters after one `advance` and log each admission (the batch sizes /health sums up)."""
        rows = len(batch.rows) if batch else 0
        if before:
            self.stats["steps"] += 1
            self.largest_batch = max(self.largest_batch, len(before))
        if newcomers:
            self.stats["prefills"] += 1
            self.largest_batch = max(self.largest_batch, len(newcomers))
            log.info("batch: %d joined, %d running, %d waiting", len(newcomers), rows, len(self.waiting))
        for row in before + newcomers:
            if row.done:
                self.stats["completed"] += 1
                self.stats["tokens"] += len(row.tokens)
            elif batch is None or row not in batch.rows:  # dropped undone: its client left
                self.stats["cancelled"] += 1
        self.running = rows

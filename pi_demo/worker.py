"""One generation at a time, in arrival order.

A Model holds one KV cache, so requests must take turns. The HTTP threads do not take the
model's lock themselves: a lock is not fair (a busy client could starve the others) and a
handler writing to a slow socket would hold the model while it waits. Instead one worker
thread runs the jobs first come, first served and puts each job's events on that job's own
queue: answers cannot mix, and generation runs at full speed whatever the clients do.
The number of waiting jobs is capped; past it `submit` refuses at once (the server answers 429)
rather than letting requests pile up for minutes on a small board.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from queue import Empty, SimpleQueue

from nomoat.runtime import GenerationStats, Grammar, Model, SamplingParams, StreamEvent


class QueueFull(Exception):
    """Too many requests are waiting; try again later."""


class ShuttingDown(Exception):
    """The server is stopping and takes no new work."""


class Cancelled(Exception):
    """The job was cancelled (client gone, or shutdown) before its answer was complete."""


class ClientGone(ConnectionAbortedError):
    """The client that asked for the job hung up; the job is cancelled."""


@dataclass
class _Finished:
    stats: GenerationStats


@dataclass(eq=False)  # each job is itself: two equal requests are still two places in line
class Job:
    """One request's generation: what to run, and the channel its results come back on."""

    prompt_ids: list[int]
    max_tokens: int
    params: SamplingParams
    stop: list[str] = field(default_factory=list)
    prompt_lookup: int = 0  # Model.stream_ids drafts only for greedy requests, so a sampled one runs plain
    cache_prompt: bool = True  # False: the prompt runs from an empty KV cache (the same answer whatever ran before)
    logprobs: int | None = None  # each token's logprob with this many alternatives; None = none
    grammar: Grammar | None = None  # what the answer must match (structured output); None = anything
    continues_prompt: bool = False  # a text completion: its text goes on from the prompt's (Model.stream_ids)
    stats: GenerationStats | None = None  # set once results() is exhausted
    _events: SimpleQueue = field(default_factory=SimpleQueue, repr=False)
    _cancelled: threading.Event = field(default_factory=threading.Event, repr=False)
    _on_cancel: Callable[[Job], None] | None = field(default=None, repr=False)  # set by Worker.submit

    def cancel(self) -> None:
        """The client is gone: stop generating for it, or take it out of the line if it has not started."""
        self._cancelled.set()
        if self._on_cancel is not None:
            self._on_cancel(self)

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def results(self, client_gone: Callable[[], bool] | None = None, every: float = 0.2) -> Iterator[StreamEvent]:
        """The events as the worker produces them; re-raises the generation's error, if any.

        With client_gone, asks it at least every `every` seconds, while the job waits in line as
        while it generates; once it says yes, cancels the job and raises ClientGone.
        """
        check_at = time.monotonic() + every
        while True:
            if client_gone is None:
                item = self._events.get()
            else:
                try:
                    item = self._events.get(timeout=max(0.0, check_at - time.monotonic()))
                except Empty:
                    item = None
                if time.monotonic() >= check_at:
                    if client_gone():
                        self.cancel()
                        raise ClientGone("the client hung up")
                    check_at = time.monotonic() + every
                if item is None:
                    continue
            if isinstance(item, _Finished):
                self.stats = item.stats
                return
            if isinstance(item, BaseException):
                raise item
            yield item


class Worker:
    def __init__(self, model: Model, max_waiting: int):
        if max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {max_waiting}")
        self.model = model
        self.max_waiting = max_waiting
        self._waiting: deque[Job] = deque()
        self._running: Job | None = None
        self._closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="nomoat-generate", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._cond:
            self._check_room()
            job._on_cancel = self._withdraw
            self._waiting.append(job)
            self._cond.notify()

    def check_room(self) -> None:
        """Raise what submit would raise now (QueueFull, ShuttingDown), without taking a job: a cheap
        look before a request's costly preparation. Only submit's own check holds a place."""
        with self._cond:
            self._check_room()

    def _check_room(self) -> None:
        if self._closed:
            raise ShuttingDown("the server is shutting down")
        # Count the running job too: between submit and the worker picking a job up, the job
        # sits in _waiting, and an idle server must still accept one request at max_waiting=0.
        if len(self._waiting) + (self._running is not None) > self.max_waiting:
            raise QueueFull(f"{len(self._waiting)} requests are already waiting (the limit is "
                            f"{self.max_waiting}); retry later")

    def _withdraw(self, job: Job) -> None:
        """Take a cancelled job out of the line at once: its place (and /health's count) is free for
        the next client now, not when the worker reaches it after the running generation."""
        with self._cond:  # re-entrant (an RLock): close() cancels while holding it
            for i, waiting in enumerate(self._waiting):
                if waiting is job:
                    del self._waiting[i]
                    job._events.put(Cancelled("cancelled before it started"))
                    return

    def status(self) -> dict[str, int | bool]:
        with self._cond:
            return {"generating": self._running is not None, "waiting": len(self._waiting),
                    "max_queue": self.max_waiting}

    def close(self, timeout: float | None = None) -> None:
        """Refuse new jobs, cancel the waiting ones and the running one, and wait for the thread."""
        with self._cond:
            self._closed = True
            for job in [*self._waiting, *([self._running] if self._running else [])]:
                job.cancel()
            self._cond.notify()
        self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._closed:
                    self._cond.wait()
                if not self._waiting:
                    return
                job = self._running = self._waiting.popleft()
            try:
                self._run(job)
            finally:
                with self._cond:
                    self._running = None

    def _run(self, job: Job) -> None:
        if job.cancelled:  # cancelled while it waited
            job._events.put(Cancelled("cancelled before it started"))
            return
        # should_stop: a client gone during a long prefill stops it between chunks, not after it.
        events = self.model.stream_ids(job.prompt_ids, job.max_tokens, params=job.params, stop=job.stop,
                                       prompt_lookup=job.prompt_lookup, cache_prompt=job.cache_prompt,
                                       should_stop=lambda: job.cancelled, logprobs=job.logprobs,
                                       grammar=job.grammar, continues_prompt=job.continues_prompt)
        try:
            for event in events:
                if job.cancelled:
                    job._events.put(Cancelled("cancelled while generating"))
                    return
                job._events.put(event)
        except Exception as e:  # the request that caused it answers with the error; the worker goes on
            job._events.put(e)
            return
        finally:
            events.close()  # stops the generation (and releases the model) if we left early
        if self.model.last_stats.stopped_in_prefill:  # should_stop said yes: no event came
            job._events.put(Cancelled("cancelled while generating"))
            return
        # stream_ids publishes its stats when it finishes; only this thread generates, so they are this job's.
        job._events.put(_Finished(self.model.last_stats))

"""Admission at the door: a request is admitted whole, or refused before any work is spent on it.

A request states what it needs from each engine: the rows it holds in that engine's queue at once
and how many sequential calls it makes. Admission reserves the rows until the request's last call of
that engine, so a later step never meets a full queue, and refuses what the engines' measured speed
says cannot finish before the deadline. Once admitted, a request runs to its end (or its deadline, or until its
client leaves).

Where a queue is full, a request waits at the door, first come first served, if the measured drain
rate says room comes within `max_admission_wait_s`: clients that retry at once would otherwise spend
the cores on refusals (docs/overload.md). The door has one line in order of arrival: a request is let in when it
fits behind the rows of everyone ahead of it who still waits on a queue it needs (one that needs other queues only
passes them), so a stream of small generations cannot keep passing a large search that waits for the student.

Host memory is admitted the same way: a request holds its images (float32, with their noise and
latents) on the host from its first stage to its answer, so the images of all requests are one more
queue, `images`, of `--max-images-mb` over one image's bytes. At 1024 px an image is about 15 MB:
without it, the engines' 4096 queued rows would exhaust the host (a search holds one chunk of its candidates).

The refusals:

- more rows than a whole queue, or more work than the timeout allows on an idle server: no retry
  can succeed -> RequestTooLarge (413 or 422, naming the field and the limit);
- no room soon enough, or a backlog that would make the request miss its deadline -> Overloaded
  (429), with Retry-After from the measured drain rate.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass

from server.costs import BatchCost, DrainMeter

# The estimates are moving averages measured on a machine shared with HTTP handling and the other
# engines: admit only what fits with this margin, so that admitted work finishes.
SAFETY = 1.25
IMAGES = "images"  # the admission queue of images held on the host (not an engine)


@dataclass(frozen=True)
class Need:
    """What one request needs from one engine."""

    engine: str
    rows: int  # held in the engine's queue at every step
    steps: int  # sequential calls
    rows_param: str  # the request field that sets `rows`, named in refusals
    steps_param: str = "steps"
    rows_what: str = ""  # what the rows are, where they are not the field's count (named in refusals)

    @property
    def work(self) -> int:
        """Row evaluations."""
        return self.rows * self.steps


@dataclass(frozen=True)
class HostWork:
    """What one request does off the engines, in one thread: encoding its images."""

    seconds: float  # measured: 0 until its kind of work has been timed once
    what: str  # for refusals, e.g. "64 images of 1024x1024 webp"
    param: str  # the request field that sets it, named in refusals


class Overloaded(Exception):
    """Too busy now; a retry after `retry_after_s` seconds may be admitted."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RequestTooLarge(Exception):
    """No retry can succeed: the request exceeds what the server admits even when idle."""

    def __init__(self, status: int, message: str, param: str):
        super().__init__(message)
        self.status, self.param = status, param


class EngineLoad:
    """What is admitted to one engine: reserved rows, work not yet done, and how fast rows drain."""

    def __init__(self, name: str, cost: BatchCost, max_batch: int, queue_delay_s: float,
                 max_rows: int | None = None, limit: str = ""):
        self.name, self.cost, self.max_batch, self.queue_delay_s = name, cost, max_batch, queue_delay_s
        self.max_rows, self.limit = max_rows, limit  # None: the server's max_queue_size; how refusals name it
        self.rows = 0  # of admitted requests
        self.waiting = 0  # of requests waiting at the door
        self.backlog = 0  # row evaluations admitted and not yet done
        self.drain = DrainMeter()

    def seconds_alone(self, need: Need) -> float:
        """The request's own time on an idle engine: its steps run one after another."""
        full, rest = divmod(need.rows, self.max_batch)
        per_step = full * self.cost.seconds(self.max_batch) + (self.cost.seconds(rest) if rest else 0.0)
        return need.steps * (per_step + self.queue_delay_s)

    def seconds(self, need: Need) -> float:
        """The request's time behind the backlog: older requests go first (the batcher runs the
        earliest deadline first), and the request's own steps cannot overlap."""
        if not self.cost.measured:
            return 0.0
        return max(self.seconds_alone(need), (self.backlog + need.work) * self.cost.seconds_per_row())

    def seconds_to_free(self, rows: int) -> float:
        """How long until `rows` reserved rows are released: at the measured drain rate, or, before
        there is one, at the engine's speed through the work admitted (the share of it `rows` stand for)."""
        rate = self.drain.rows_per_s()
        if rate:
            return rows / rate
        if not self.cost.measured:
            return 1.0
        return self.backlog * self.cost.seconds_per_row() * min(1.0, rows / max(self.rows, 1))


class Ticket:
    """An admitted request: its deadline, and the work it still holds on each engine.

    Each engine call of the request's stages reports what it did (`advance`); an engine the request will not call
    again gets its rows back at once (`done_with`: a prompt's text encoding need not hold its rows while a
    long teacher runs), and the rest is released when the request ends, however it ends
    (`async with admission.admitted(...)`).
    """

    def __init__(self, deadline: float, needs: tuple[Need, ...] = (), admission: Admission | None = None,
                 host_s: float = 0.0):
        self.deadline, self.needs, self._admission, self.host_s = deadline, needs, admission, host_s
        self._left = {need.engine: need.work for need in needs}
        self._held = set(self._left)  # engines whose rows the request still holds

    def advance(self, engine: str, rows: int) -> None:
        left = self._left.get(engine)
        if left is None:
            return
        done = min(rows, left)
        self._left[engine] = left - done
        self._admission.loads[engine].backlog -= done

    def done_with(self, engine: str) -> None:
        """The request makes no more calls of `engine`: free its rows and work there now."""
        if self._admission is not None and engine in self._held:
            self._held.discard(engine)
            self._admission.released(tuple(n for n in self.needs if n.engine == engine), self._left)

    def release(self) -> None:
        if self._admission is not None:
            admission, self._admission = self._admission, None
            admission.released(tuple(n for n in self.needs if n.engine in self._held), self._left, self.host_s)


@dataclass
class Waiter:
    """A request waiting at the door for room in a full queue."""

    needs: tuple[Need, ...]
    deadline: float
    admitted: asyncio.Future  # resolves to its Ticket
    host_s: float = 0.0  # its encoding's seconds


class Admission:
    """One per server: every engine's load, the decision to admit, make wait, or refuse, and the
    line of requests waiting at the door (first come first served on every queue they share)."""

    def __init__(self, loads: dict[str, EngineLoad], max_queue_rows: int, timeout_s: float, max_wait_s: float,
                 metrics=None, clock=time.monotonic, host_threads: int = 1):
        self.loads, self.max_queue_rows, self.timeout_s = loads, max_queue_rows, timeout_s
        self.max_wait_s, self.metrics, self.clock = max_wait_s, metrics, clock
        # the encoding admitted and not yet done, in seconds of one thread, and the threads that share it
        self.host_backlog_s, self.host_threads = 0.0, host_threads
        self._line: deque[Waiter] = deque()  # in order of arrival
        if metrics:
            metrics.watch_admission(loads)

    @classmethod
    def for_batchers(cls, batchers: dict, settings, metrics=None, host_threads: int = 1,
                     image_bytes: int = 0) -> Admission:
        """Admission for the server's engines, and (`image_bytes`: the host bytes one image of the request holds)
        the images queue that bounds host memory by `settings.max_images_mb`."""
        loads = {name: EngineLoad(name, b.cost, b.max_batch_size, b.max_delay_s) for name, b in batchers.items()}
        if image_bytes:
            budget_mb = settings.max_images_mb
            loads[IMAGES] = EngineLoad(IMAGES, BatchCost(), 1, 0.0, max_rows=images_fitting(budget_mb, image_bytes),
                                       limit=f"{budget_mb:g} MB of host memory for images, "
                                             f"{image_bytes / 2**20:.3g} MB each (FLOWMAP_MAX_IMAGES_MB)")
        return cls(loads, settings.max_queue_size, settings.request_timeout_s, settings.max_admission_wait_s,
                   metrics, host_threads=host_threads)

    @asynccontextmanager
    async def admitted(self, needs: list[Need], deadline: float, host: HostWork | None = None):
        """`async with admission.admitted(needs, deadline, host) as ticket:` the request's whole life."""
        ticket = await self.admit(needs, deadline, host)
        try:
            yield ticket
        finally:
            ticket.release()

    async def admit(self, needs: list[Need], deadline: float, host: HostWork | None = None) -> Ticket:
        """Reserve what the whole request needs. Where a queue is full, wait at the door behind the
        requests already waiting, if the measured drain rate says room comes within `max_wait_s`;
        otherwise raise Overloaded. RequestTooLarge where no wait could help. `host`: its work off the engines
        (encoding), counted in its time."""
        needs, host_s = tuple(needs), host.seconds if host else 0.0
        self._check_size(needs, host)
        # last in line: behind the rows of everyone waiting on its queues
        if self._fits(needs, {name: load.waiting for name, load in self.loads.items()}):
            return self._reserve(needs, deadline, host_s)
        wait = self._wait_estimate(needs)
        if wait > self.max_wait_s:
            self._refused("queue_full")
            fullest = self._fullest(needs)
            load, rows = self.loads[fullest], next(n.rows for n in needs if n.engine == fullest)
            ahead = f", {load.waiting} more waiting ahead" if load.waiting else ""
            raise Overloaded(f"the {fullest} queue is full for {rows} more rows ({load.rows} of "
                             f"{self.max_rows(fullest)} admitted{ahead}); room in about {wait:.3g} s", wait)
        loop = asyncio.get_running_loop()
        waiter = Waiter(needs, deadline, loop.create_future(), host_s)
        self._line.append(waiter)
        self._waiting(needs, +1)
        timer = loop.call_later(self.max_wait_s, self._give_up, waiter)
        try:
            return await waiter.admitted
        except asyncio.CancelledError:  # the client left while waiting
            self._leave(waiter)
            raise
        finally:
            timer.cancel()

    def _give_up(self, waiter: Waiter) -> None:
        """The longest wait has passed with no room: out of the line, and a 429; those behind it may fit now."""
        if waiter.admitted.done():
            return
        self._out_of_line(waiter)
        self._refused("queue_full")
        wait = self._wait_estimate(waiter.needs)
        waiter.admitted.set_exception(Overloaded(
            f"the {self._fullest(waiter.needs)} queue had no room within {self.max_wait_s:g} s "
            f"(FLOWMAP_MAX_ADMISSION_WAIT_S); room in about {wait:.3g} s", wait))
        self._let_in()

    def _leave(self, waiter: Waiter) -> None:
        """A waiter's client left: out of the line (those behind it may fit now), or its ticket released if it was
        admitted meanwhile."""
        if waiter in self._line:
            self._out_of_line(waiter)
            self._let_in()
        admitted = waiter.admitted
        if admitted.done() and not admitted.cancelled() and admitted.exception() is None:
            admitted.result().release()

    def _out_of_line(self, waiter: Waiter) -> None:
        self._line.remove(waiter)
        self._waiting(waiter.needs, -1)

    def _let_in(self) -> None:
        """Admit, in order of arrival, each waiter that fits behind the rows of those ahead of it still waiting on
        the queues it needs."""
        ahead: dict[str, int] = {}
        for waiter in list(self._line):
            if waiter.admitted.done():  # its client left; _leave finds it gone from the line
                self._out_of_line(waiter)
            elif self._fits(waiter.needs, ahead):
                self._out_of_line(waiter)
                try:
                    waiter.admitted.set_result(self._reserve(waiter.needs, waiter.deadline, waiter.host_s))
                except Overloaded as err:
                    waiter.admitted.set_exception(err)
            else:
                for need in waiter.needs:
                    ahead[need.engine] = ahead.get(need.engine, 0) + need.rows

    def released(self, needs: tuple[Need, ...], work_left: dict[str, int], host_s: float = 0.0) -> None:
        """A request ended: free its rows, work and encoding, then let in whoever fits, first come first served."""
        self.host_backlog_s = max(0.0, self.host_backlog_s - host_s)
        for need in needs:
            load = self.loads[need.engine]
            load.rows -= need.rows
            load.backlog -= work_left[need.engine]
            load.drain.record(need.rows)
        self._let_in()

    def max_rows(self, engine: str) -> int:
        """The rows of admitted requests `engine`'s queue holds at most."""
        load = self.loads[engine]
        return self.max_queue_rows if load.max_rows is None else load.max_rows

    def _check_size(self, needs: tuple[Need, ...], host: HostWork | None = None) -> None:
        for need in needs:
            most, load = self.max_rows(need.engine), self.loads[need.engine]
            if need.rows > most:
                self._refused("too_large")
                what = f" ({need.rows_what})" if need.rows_what else ""
                raise RequestTooLarge(413, f"{need.rows_param}: {need.rows} rows{what} exceed the whole {need.engine} "
                                           f"queue of {most} rows ({load.limit or 'FLOWMAP_MAX_QUEUE_SIZE'}); split "
                                           "the request", need.rows_param)
        measured = [n for n in needs if self.loads[n.engine].cost.measured]
        alone = sum(self.loads[n.engine].seconds_alone(n) for n in measured)
        if host and SAFETY * (alone + host.seconds) > self.timeout_s and host.seconds >= alone:
            self._refused("too_large")
            raise RequestTooLarge(422, f"{host.param}: encoding {host.what} takes about {SAFETY * host.seconds:.1f} "
                                       f"s at the measured speed (the engines' work about {SAFETY * alone:.1f} s "
                                       f"more), more than the {self.timeout_s:g} s request timeout "
                                       "(FLOWMAP_REQUEST_TIMEOUT_S); ask for fewer or smaller images, or another "
                                       "output_format", host.param)
        alone += host.seconds if host else 0.0
        if SAFETY * alone > self.timeout_s:
            worst = max(measured, key=lambda n: self.loads[n.engine].seconds_alone(n))
            self._refused("too_large")
            fewer = "images" if worst.steps_param == worst.rows_param else "steps or images"
            raise RequestTooLarge(422, f"{worst.steps_param}: {worst.rows} rows x {worst.steps} steps need about "
                                       f"{SAFETY * alone:.1f} s at the engines' measured speed, more than the "
                                       f"{self.timeout_s:g} s request timeout (FLOWMAP_REQUEST_TIMEOUT_S); ask for "
                                       f"fewer {fewer}", worst.steps_param)

    def _fits(self, needs: tuple[Need, ...], ahead: dict[str, int]) -> bool:
        """Whether the needs fit their queues now behind the rows `ahead` of them (by queue) in the line."""
        return all(self.loads[n.engine].rows + ahead.get(n.engine, 0) + n.rows <= self.max_rows(n.engine)
                   for n in needs)

    def _fullest(self, needs: tuple[Need, ...]) -> str:
        """The queue nearest its size, as a fraction of it (the images queue's rows are not an engine's)."""
        return max(needs, key=lambda n: (self.loads[n.engine].rows + self.loads[n.engine].waiting)
                   / self.max_rows(n.engine)).engine

    def _wait_estimate(self, needs: tuple[Need, ...]) -> float:
        """Seconds until the rows admitted and waiting ahead have drained enough to let this request in."""
        waits = []
        for need in needs:
            load = self.loads[need.engine]
            ahead = load.rows + load.waiting + need.rows - self.max_rows(need.engine)
            waits.append(load.seconds_to_free(ahead) if ahead > 0 else 0.0)
        return max(waits)

    def _waiting(self, needs: tuple[Need, ...], sign: int) -> None:
        for need in needs:
            self.loads[need.engine].waiting += sign * need.rows

    def _reserve(self, needs: tuple[Need, ...], deadline: float, host_s: float = 0.0) -> Ticket:
        """Admit, unless the work ahead, and its own encoding after it, means this request would miss its deadline.
        Its encoding starts once its engine work is done and the encoding admitted before it has left a thread
        free, whichever comes later."""
        engines = sum(self.loads[n.engine].seconds(n) for n in needs)
        encoders = self.host_backlog_s / self.host_threads if host_s else 0.0
        estimate = SAFETY * (max(engines, encoders) + host_s)
        budget = deadline - self.clock()
        if estimate > budget:
            self._refused("backlog")
            wait = (estimate - budget) / SAFETY  # the backlog drains in real time
            busy = "image encoders" if encoders > engines else "engines"
            raise Overloaded(f"the {busy} are busy: this request would finish in about {estimate:.3g} s, after its "
                             f"deadline ({self.timeout_s:g} s from arrival); retry after {wait:.3g} s", wait)
        for need in needs:
            load = self.loads[need.engine]
            load.rows += need.rows
            load.backlog += need.work
        self.host_backlog_s += host_s
        return Ticket(deadline, needs, self, host_s)

    def _refused(self, reason: str) -> None:
        if self.metrics:
            self.metrics.rejected.labels(reason=reason).inc()


def images_fitting(budget_mb: float, image_bytes: int) -> int:
    """How many images `budget_mb` holds (at least one: a budget below one image still serves one at a time)."""
    return max(1, int(budget_mb * 2**20 // image_bytes))


def images_need(needs: list[Need], held: Need | None = None) -> Need:
    """The images a request holds on the host from its first stage to its answer: as many as its widest stage's
    rows, or `held` where a stage holds more than its rows (a search's chunk and its best), for its whole life
    (no steps of work)."""
    widest = max(needs, key=lambda need: need.rows)
    if held is not None and held.rows > widest.rows:
        return held
    return Need(IMAGES, widest.rows, 0, widest.rows_param, widest.rows_param)


def retry_after_headers(seconds: float) -> dict[str, str]:
    """Retry-After in whole seconds, rounded up. No sub-second hint (OpenAI's `retry-after-ms`): the
    refused clients would all come back after the few milliseconds one request's rows take to free,
    and their refusals then cost more CPU than the work (docs/overload.md measures it)."""
    return {"Retry-After": str(max(1, math.ceil(seconds)))}

"""Admission at the door, on engine costs we set by hand and a clock we move by hand."""

import asyncio

import pytest

from server.admission import (
    IMAGES,
    SAFETY,
    Admission,
    EngineLoad,
    HostWork,
    Need,
    Overloaded,
    RequestTooLarge,
    images_fitting,
    images_need,
    retry_after_headers,
)
from server.costs import BatchCost, DrainMeter, bucket


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def make_admission(max_rows=64, timeout_s=10.0, seconds_per_batch=0.064, max_batch=64, max_wait_s=0.0):
    """One 'student' engine whose full batch of 64 rows takes `seconds_per_batch` (1 ms a row)."""
    clock = Clock()
    cost = BatchCost()
    cost.observe(max_batch, seconds_per_batch)
    cost.observe(1, seconds_per_batch / 8)
    load = EngineLoad("student", cost, max_batch, queue_delay_s=0.0)
    load.drain = DrainMeter(window_s=2.0, clock=clock)
    return Admission({"student": load}, max_rows, timeout_s, max_wait_s, clock=clock), load, clock


def need(rows, steps=2):
    return Need("student", rows, steps, "labels")


def admit(admission, needs, deadline):
    """Admission without waiting (max_wait_s = 0 in these tests): it decides at once."""
    return asyncio.run(admission.admit(needs, deadline))


def test_rows_stay_reserved_until_the_request_ends():
    admission, load, clock = make_admission(max_rows=64)
    first = admit(admission, [need(40)], clock() + 10)
    assert load.rows == 40 and load.backlog == 80
    # no one waits (max_wait_s = 0): refused at once
    with pytest.raises(Overloaded, match=r"queue is full for 30 more rows \(40 of 64 admitted\); room in"):
        admit(admission, [need(30)], clock() + 10)
    # the first request's steps run; its rows stay reserved until it ends
    first.advance("student", 40)
    assert load.rows == 40 and load.backlog == 40
    with pytest.raises(Overloaded):
        admit(admission, [need(30)], clock() + 10)
    first.release()
    assert load.rows == 0 and load.backlog == 0
    admit(admission, [need(30)], clock() + 10).release()


def test_release_returns_the_work_not_done_and_is_idempotent():
    admission, load, clock = make_admission()
    ticket = admit(admission, [need(10, steps=5)], clock() + 10)
    ticket.advance("student", 10)  # one of five steps done, then the client leaves
    ticket.release()
    ticket.release()
    assert load.rows == 0 and load.backlog == 0


def drain(admission, clock, releases: int, rows: int, every_s: float) -> None:
    """`releases` requests of `rows` rows end `every_s` apart."""
    for _ in range(releases):
        admit(admission, [need(rows)], clock() + 10).release()
        clock.now += every_s


def test_retry_after_follows_the_measured_drain_rate():
    admission, load, clock = make_admission(max_rows=64)
    drain(admission, clock, 10, 32, 0.1)  # 320 rows over the 1 s since the first release
    holder = admit(admission, [need(64)], clock() + 10)
    with pytest.raises(Overloaded) as refused:
        admit(admission, [need(16)], clock() + 10)
    assert refused.value.retry_after_s == pytest.approx(16 / 320)
    holder.release()
    clock.now += 5  # nothing drained lately: the estimate falls back to the engine's speed through
    holder = admit(admission, [need(64)], clock() + 10)  # the admitted work (2 steps of 64 rows, 1 ms a row)
    with pytest.raises(Overloaded) as refused:
        admit(admission, [need(16)], clock() + 10)
    assert refused.value.retry_after_s == pytest.approx(64 * 2 * 0.001 * 16 / 64)
    holder.release()


def test_a_few_releases_after_an_idle_spell_are_not_taken_for_the_rate():
    meter = DrainMeter(window_s=2.0, min_events=8, clock=Clock())
    for _ in range(7):
        meter.record(4)
    assert meter.rows_per_s() is None
    meter.clock.now += 0.5
    meter.record(4)
    assert meter.rows_per_s() == pytest.approx(32 / 0.5)


def test_a_request_larger_than_the_queue_is_413_not_429():
    admission, _, clock = make_admission(max_rows=64)
    with pytest.raises(RequestTooLarge) as refused:
        admit(admission, [need(65)], clock() + 10)
    assert refused.value.status == 413 and refused.value.param == "labels"
    assert "65 rows exceed the whole student queue of 64 rows" in str(refused.value)


def test_work_that_cannot_finish_even_alone_is_422_naming_steps():
    admission, _, clock = make_admission(max_rows=4096, timeout_s=10.0)
    # 64 rows x 200 steps = 200 full batches of 64 ms = 12.8 s alone > 10 s
    with pytest.raises(RequestTooLarge) as refused:
        admit(admission, [need(64, steps=200)], clock() + 10)
    assert refused.value.status == 422 and refused.value.param == "steps"
    admit(admission, [need(64, steps=100)], clock() + 10).release()  # 6.4 s x SAFETY = 8 s fits


def test_encoding_counts_in_a_requests_time_alone_and_behind_the_backlog():
    admission, load, clock = make_admission(max_rows=4096, timeout_s=10.0)
    encode = HostWork(8.0, "64 images of 1024x1024 webp", "labels")
    with pytest.raises(RequestTooLarge, match="labels: encoding 64 images of 1024x1024 webp takes about 10.0 s"
                       ) as refused:  # 0.64 + 8 s, x SAFETY > 10 s
        asyncio.run(admission.admit([need(64, steps=10)], clock() + 10, encode))
    assert refused.value.status == 422 and refused.value.param == "labels"  # encoding is the larger part
    with pytest.raises(RequestTooLarge) as refused:  # the engines are the larger part: their steps are named
        asyncio.run(admission.admit([need(64, steps=100)], clock() + 10, HostWork(2.0, "images", "labels")))
    assert refused.value.param == "steps"
    first = asyncio.run(admission.admit([need(64, steps=100)], clock() + 10, HostWork(1.0, "images", "labels")))
    with pytest.raises(Overloaded, match="after its deadline"):  # 6.4 s ahead, 0.64 + 1.5 s its own: x SAFETY > 10
        asyncio.run(admission.admit([need(64, steps=10)], clock() + 10, HostWork(1.5, "images", "labels")))
    admit(admission, [need(64, steps=10)], clock() + 10).release()  # without its encoding it would have fit
    first.release()
    assert load.rows == 0


def test_encoding_admitted_ahead_shares_the_encode_threads_and_a_request_behind_it_is_429():
    """Requests admitted before this one encode first, on the server's encode threads: one whose own encoding
    would wait behind theirs past its deadline is refused before any work (it was admitted, then 504), and a
    request that encodes nothing does not wait for the encoders."""
    admission, load, clock = make_admission(max_rows=4096, timeout_s=10.0)
    admission.host_threads = 2
    images = HostWork(3.0, "64 images", "labels")
    # the 4th finishes in about (9 / 2 + 3) x SAFETY s: within its 10
    ahead = [asyncio.run(admission.admit([need(1)], clock() + 10, images)) for _ in range(4)]
    assert admission.host_backlog_s == pytest.approx(12.0)
    with pytest.raises(Overloaded, match="the image encoders are busy") as refused:  # (12 / 2 + 3) x SAFETY > 10
        asyncio.run(admission.admit([need(1)], clock() + 10, images))
    assert refused.value.retry_after_s == pytest.approx((SAFETY * 9 - 10) / SAFETY)
    admit(admission, [need(1)], clock() + 10).release()  # raw arrays: no encoding to wait for
    ahead[0].release()  # its images are out: 9 s of encoding left on two threads
    asyncio.run(admission.admit([need(1)], clock() + 10, images)).release()
    for ticket in ahead[1:]:
        ticket.release()
    assert admission.host_backlog_s == pytest.approx(0.0) and load.rows == 0


def test_a_backlog_that_would_miss_the_deadline_is_429_and_admitted_work_is_kept():
    admission, load, clock = make_admission(max_rows=4096, timeout_s=10.0)
    first = admit(admission, [need(64, steps=100)], clock() + 10)  # 6.4 s of engine time
    with pytest.raises(Overloaded, match="after its deadline") as refused:
        admit(admission, [need(64, steps=100)], clock() + 10)  # would end at 12.8 s x SAFETY
    assert refused.value.retry_after_s == pytest.approx((SAFETY * 12.8 - 10) / SAFETY)
    first.advance("student", 64 * 60)  # 60 of its 100 steps done: 2.56 s of it left
    admit(admission, [need(64, steps=50)], clock() + 10).release()  # 2.56 + 3.2 s fits now
    assert load.rows == 64
    first.release()


def test_needs_on_several_engines_are_reserved_together():
    admission, load, clock = make_admission(max_rows=64)
    cost = BatchCost()
    cost.observe(64, 0.064)
    admission.loads["verifier"] = EngineLoad("verifier", cost, 64, 0.0)
    full_verifier = admit(admission, [Need("verifier", 60, 1, "n")], clock() + 10)
    with pytest.raises(Overloaded, match="verifier queue is full"):
        admit(admission, [need(10), Need("verifier", 10, 1, "n")], clock() + 10)
    assert load.rows == 0  # nothing was reserved on the student for the refused search
    full_verifier.release()


def test_host_memory_for_images_is_a_queue_of_its_own():
    """Images held on the host bound what is admitted, beside the engines' rows: a request larger than the whole
    budget is 413 naming its rows field, one that finds the budget taken is 429, and the images come back only
    when the request ends (its answer is encoded from them)."""
    admission, load, clock = make_admission(max_rows=64)
    admission.loads[IMAGES] = EngineLoad(IMAGES, BatchCost(), 1, 0.0, max_rows=images_fitting(1.0, 2**20 // 10),
                                         limit="1 MB of host memory for images (FLOWMAP_MAX_IMAGES_MB)")
    assert admission.max_rows(IMAGES) == 10 and admission.max_rows("student") == 64

    def needs(rows):
        engines = [need(rows), Need("student", 2, 1, "n")]
        return [*engines, images_need(engines)]

    assert needs(6)[-1] == Need(IMAGES, 6, 0, "labels", "labels")  # the widest stage's rows, no work
    with pytest.raises(RequestTooLarge, match=r"labels: 11 rows exceed the whole images queue of 10 rows \(1 MB"):
        admit(admission, needs(11), clock() + 10)
    first = admit(admission, needs(6), clock() + 10)
    first.done_with("student")  # the engines are done with it; its images are still being encoded
    assert load.rows == 0 and admission.loads[IMAGES].rows == 6
    with pytest.raises(Overloaded, match=r"the images queue is full for 6 more rows \(6 of 10 admitted\)"):
        admit(admission, needs(6), clock() + 10)
    first.release()
    assert admission.loads[IMAGES].rows == 0 and admission.loads[IMAGES].backlog == 0
    admit(admission, needs(10), clock() + 10).release()
    assert images_fitting(0.001, 2**20) == 1  # a budget below one image still serves one at a time


def test_retry_after_headers_round_up():
    assert retry_after_headers(0.0123) == {"Retry-After": "1"}
    assert retry_after_headers(2.5) == {"Retry-After": "3"}


def test_batch_costs_by_bucket():
    cost = BatchCost()
    cost.observe(64, 0.064)
    cost.observe(1, 0.004)
    assert bucket(5) == 8 and bucket(64) == 64 and bucket(65) == 128
    assert cost.seconds(5) == 0.064  # borrows the bucket above: never an underestimate
    assert cost.seconds(256) == pytest.approx(4 * 0.064)  # scales the largest measured linearly
    assert cost.seconds_per_row() == pytest.approx(0.001)


async def settle():
    """Let every task that can run, run (a few turns of the event loop)."""
    for _ in range(10):
        await asyncio.sleep(0)


def test_a_full_queue_makes_requests_wait_in_arrival_order():
    async def scenario():
        admission, load, clock = make_admission(max_rows=64, max_wait_s=5.0)
        for _ in range(8):  # a drain rate to estimate the wait from
            (await admission.admit([need(16)], clock() + 10)).release()
            clock.now += 0.01
        holders = [await admission.admit([need(32)], clock() + 10) for _ in range(2)]
        waiting = [asyncio.ensure_future(admission.admit([need(32)], clock() + 10)) for _ in range(3)]
        await settle()
        assert load.waiting == 96 and not any(w.done() for w in waiting)
        late = asyncio.ensure_future(admission.admit([need(8)], clock() + 10))  # no overtaking the line
        await settle()
        assert not late.done()
        holders[0].release()  # room for one: the first in line, not the small newcomer
        await settle()
        assert [w.done() for w in waiting] == [True, False, False] and not late.done()
        assert load.rows == 64 and load.waiting == 72
        waiting[0].result().release()
        holders[1].release()
        await settle()
        assert [w.done() for w in waiting] == [True, True, True] and not late.done()
        for w in waiting[1:]:
            w.result().release()
        await settle()
        late.result().release()
        assert load.rows == 0 and load.waiting == 0

    asyncio.run(scenario())


def test_a_waiter_refused_after_the_longest_wait_and_one_that_leaves_takes_nothing():
    async def scenario():
        admission, load, clock = make_admission(max_rows=64, max_wait_s=0.3)
        for _ in range(8):
            (await admission.admit([need(16)], clock() + 10)).release()
            clock.now += 0.01
        holder = await admission.admit([need(64)], clock() + 10)
        with pytest.raises(Overloaded, match="had no room within 0.3 s"):
            await admission.admit([need(8)], clock() + 10)
        leaver = asyncio.ensure_future(admission.admit([need(8)], clock() + 10))
        await settle()
        leaver.cancel()  # the client went away while waiting
        await asyncio.gather(leaver, return_exceptions=True)
        assert load.waiting == 0
        holder.release()
        assert load.rows == 0

    asyncio.run(scenario())


def test_no_wait_when_the_estimate_says_room_comes_too_late():
    async def scenario():
        admission, load, clock = make_admission(max_rows=64, max_wait_s=0.5)
        for _ in range(8):  # 8 rows over 2 s: 4 rows/s
            (await admission.admit([need(1)], clock() + 10)).release()
            clock.now += 0.25
        holder = await admission.admit([need(64)], clock() + 10)
        with pytest.raises(Overloaded, match="queue is full") as refused:
            await admission.admit([need(8)], clock() + 10)
        assert refused.value.retry_after_s == pytest.approx(8 / 4)
        assert load.waiting == 0
        holder.release()

    asyncio.run(scenario())


def test_a_small_newcomer_does_not_overtake_a_waiting_request():
    async def scenario():
        admission, load, clock = make_admission(max_rows=64, max_wait_s=5.0)
        for _ in range(8):
            (await admission.admit([need(16)], clock() + 10)).release()
            clock.now += 0.01
        holder = await admission.admit([need(40)], clock() + 10)
        big = asyncio.ensure_future(admission.admit([need(32)], clock() + 10))  # 40 + 32 > 64: waits
        await settle()
        small = asyncio.ensure_future(admission.admit([need(8)], clock() + 10))  # would fit, but must queue
        await settle()
        assert not big.done() and not small.done() and load.rows == 40
        holder.release()
        await settle()
        assert big.done() and small.done() and load.rows == 40
        big.result().release()
        small.result().release()

    asyncio.run(scenario())


def test_a_stream_of_small_generations_does_not_pass_a_search_waiting_for_the_student():
    """A search (student and verifier) waits for the student behind generations (student only), one of which
    waited before it: as each generation ends, the room goes to whoever came first, so the search gets in before
    any generation that came after it, small ones that would fit the room it waits for included."""
    async def scenario():
        admission, load, clock = make_admission(max_rows=64, max_wait_s=5.0)
        admission.loads["verifier"] = EngineLoad("verifier", load.cost, 64, queue_delay_s=0.0)
        for _ in range(8):
            (await admission.admit([need(16)], clock() + 10)).release()
            clock.now += 0.01
        held = [await admission.admit([need(24)], clock() + 10) for _ in range(2)]
        earlier = asyncio.ensure_future(admission.admit([need(24)], clock() + 10))  # waits first, in the line
        await settle()
        search = asyncio.ensure_future(admission.admit([need(32), Need("verifier", 32, 1, "n")], clock() + 10))
        await settle()
        later = []
        while not search.done():  # one generation ends, a small one arrives
            later.append(asyncio.ensure_future(admission.admit([need(8)], clock() + 10)))
            await settle()  # in line before the room frees
            held.pop(0).release()
            await settle()
            assert search.done() or not any(ticket.done() for ticket in later), "a later generation passed it"
            held += [ticket.result() for ticket in (earlier, *later) if ticket.done() and ticket.result() not in held]
            assert len(later) < 4, "the search never got in"
        assert earlier.done() and admission.loads["verifier"].rows == 32
        for ticket in (*held, search.result()):
            ticket.release()
        await settle()
        for ticket in later:
            if ticket.result() not in held:
                ticket.result().release()
        assert load.rows == 0 and load.waiting == 0

    asyncio.run(scenario())


def test_when_a_waiter_gives_up_or_leaves_those_behind_it_that_fit_are_let_in():
    """A small request waits only behind a search's rows; when the search gives up (its longest wait passed) or its
    client leaves, the small one fits and is let in then, not refused later with room free."""
    async def scenario(search_goes):
        admission, load, clock = make_admission(max_rows=64, max_wait_s=5.0)
        admission.loads["verifier"] = EngineLoad("verifier", load.cost, 64, queue_delay_s=0.0)
        for _ in range(8):
            (await admission.admit([need(16)], clock() + 10)).release()
            clock.now += 0.01
        holder = await admission.admit([need(40)], clock() + 10)
        search = asyncio.ensure_future(admission.admit([need(32), Need("verifier", 32, 1, "n")], clock() + 10))
        await settle()
        small = asyncio.ensure_future(admission.admit([need(8)], clock() + 10))  # 40 + 8 fits; 40 + 32 + 8 not
        await settle()
        assert not search.done() and not small.done()
        if search_goes == "gives up":
            admission._give_up(admission._line[0])  # as its timer would, at max_wait_s
        else:
            search.cancel()
        await settle()
        assert small.done() and load.rows == 48 and load.waiting == 0
        small.result().release()
        holder.release()
        await asyncio.gather(search, return_exceptions=True)

    for search_goes in ("gives up", "leaves"):
        asyncio.run(scenario(search_goes))


def test_a_single_call_too_slow_for_the_timeout_names_its_rows_field():
    """A decoder, verifier or text encoder runs once a request: the refusal names the field that sets its rows (a
    search's n), not a `steps` the route may not have."""
    from server.stages import Decode, needs_of

    (decode,) = needs_of([Decode(1024, "n")])
    assert decode.steps_param == "n"
    admission, _, clock = make_admission(max_rows=4096, timeout_s=0.5)
    with pytest.raises(RequestTooLarge, match="ask for fewer images$") as refused:  # 16 batches of 64 x 0.064 s
        admit(admission, [Need("student", 1024, 1, "n", steps_param="n")], clock() + 0.5)
    assert refused.value.status == 422 and refused.value.param == "n"


def test_a_search_reserves_one_chunk_of_rows_for_as_many_calls_as_it_has_chunks():
    """150 candidates are made, decoded and scored 64 at a time: each engine holds 64 rows (the teacher's finish and
    its decoding top_k), for 3 chunks of calls; the student's jumps count each chunk's steps."""
    from server.encoding import OutputFormat
    from server.stages import EncodeImages, images_held, needs_of, plan_search

    encode = EncodeImages(None, OutputFormat("png"), (3, 4, 4), 5, "top_k")
    stages = plan_search((4, 2, 2), 1.0, 150, 2, 5, 3, encode, decode=True)
    needs = {need.engine: need for need in needs_of(stages)}
    assert (needs["student@1"].rows, needs["student@1"].steps) == (64, 2 * 3)
    assert (needs["decoder"].rows, needs["decoder"].steps) == (64, 3 + 1)  # the chunks, then the teacher's images
    assert (needs["verifier"].rows, needs["verifier"].steps) == (64, 3 + 1)
    assert (needs["teacher"].rows, needs["teacher"].steps) == (5, 3)
    # on the host it holds a chunk, its best 5 and the next best 5 picked from both
    assert images_need(needs_of(stages), images_held(stages)).rows == 64 + 2 * 5
    assert images_need(needs_of(stages)).rows == 64  # its widest stage alone
    # a refusal names the field that holds the more of them: n for a chunk and 2 x 5, top_k for a chunk and 2 x 40
    assert images_held(stages).rows_param == "n"
    assert images_held(plan_search((4, 2, 2), 1.0, 150, 2, 40, 0, encode)).rows_param == "top_k"


def test_a_refusal_names_the_queue_nearest_its_size_not_the_largest():
    """The images queue counts far more rows than an engine's: a full student queue is named as the reason even
    while the images queue, much larger, holds more rows."""
    admission, load, clock = make_admission(max_rows=64)
    admission.loads[IMAGES] = EngineLoad(IMAGES, BatchCost(), 1, 0.0, max_rows=1000)
    admit(admission, [need(64), Need(IMAGES, 64, 0, "labels")], clock() + 10)
    admission.loads[IMAGES].rows += 200  # other requests' images, on engines this one does not use
    with pytest.raises(Overloaded, match="the student queue is full"):
        admit(admission, [need(1), Need(IMAGES, 1, 0, "labels")], clock() + 10)


def test_an_engine_the_request_will_not_call_again_gets_its_rows_back_at_once():
    """A latent request's student rows go back as its decoding starts, not when it ends: a request waiting for the
    student is admitted while the first still decodes (so a prompt's text encoding holds no rows while its teacher
    runs). The engines are a stand-in `call` that holds the decoder until told."""
    import numpy as np

    from server.engines import student_engine
    from server.stages import State, needs_of, plan_generation, run_stages

    student = student_engine(1.0)
    clock = Clock()
    loads = {}
    for name in (student, "decoder"):
        cost = BatchCost()
        cost.observe(8, 0.008)
        loads[name] = EngineLoad(name, cost, 8, queue_delay_s=0.0)
    admission = Admission(loads, 8, 10.0, 5.0, clock=clock)
    stages = plan_generation((4, 2, 2), "student", 1.0, 2, 8, "labels", None, decode=True)

    async def scenario():
        decoding, decoded = asyncio.Event(), asyncio.Event()

        async def call(engine, feeds, ticket):
            ticket.advance(engine, 8)
            if engine == "decoder":
                decoding.set()
                await decoded.wait()
                return np.zeros((8, 3, 16, 16), np.float32)
            return feeds["x"]

        first = await admission.admit(needs_of(stages), clock() + 10)
        run = asyncio.ensure_future(run_stages(stages, State(list(range(8)), np.zeros(8, np.int64)), call, first))
        await decoding.wait()
        assert (loads[student].rows, loads[student].backlog, loads["decoder"].rows) == (0, 0, 8)
        second = await asyncio.wait_for(admission.admit([Need(student, 8, 2, "labels")], clock() + 10), 1.0)
        assert loads[student].rows == 8
        decoded.set()
        await run
        first.release()
        assert (loads[student].rows, loads["decoder"].rows, loads["decoder"].backlog) == (8, 0, 0)
        second.release()
        assert loads[student].rows == 0 and loads[student].backlog == 0

    asyncio.run(scenario())


def test_one_slow_batch_moves_the_cost_by_a_step_and_a_lasting_slowdown_is_followed():
    """A lone batch 100 times slower (a collection pause) must not make admission tell clients to wait minutes."""
    cost = BatchCost()
    for _ in range(5):
        cost.observe(8, 0.001)
    cost.observe(8, 0.1)
    assert cost.seconds(8) == pytest.approx(0.8 * 0.001 + 0.2 * 0.004)
    for _ in range(20):
        cost.observe(8, 0.1)
    assert cost.seconds(8) == pytest.approx(0.1, rel=0.05)
    # a bucket's first run is held to what it borrowed: 16 rows borrow the 64-row bucket's 4 ms
    cost.observe(64, 0.004)
    cost.observe(16, 10.0)
    assert cost.seconds(16) == pytest.approx(4 * 0.004)

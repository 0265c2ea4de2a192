"""The keyed batcher groups compatible jobs, never mixes keys, and respects its budgets.

`run_batch` here is a recording stand-in for the pipeline call: these tests are about grouping.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from deployments.common.batcher import BatchLimits, KeyedBatcher


class Recorder:
    def __init__(self, delay: float = 0.0) -> None:
        self.batches: list[list[tuple[str, int]]] = []
        self.delay = delay

    def __call__(self, items):
        self.batches.append(list(items))
        time.sleep(self.delay)
        return [f"done {key} {n}" for key, n in items]


def batcher(recorder, max_cost=100.0, max_items=8, max_wait_s=0.05):
    return KeyedBatcher(recorder, BatchLimits(max_cost=max_cost, max_items=max_items, max_wait_s=max_wait_s))


async def test_jobs_with_the_same_key_share_one_call():
    rec = Recorder()
    b = batcher(rec)
    results = await asyncio.gather(*(b.submit("A", ("A", i), cost=1) for i in range(4)))
    assert results == [f"done A {i}" for i in range(4)]
    assert len(rec.batches) == 1 and len(rec.batches[0]) == 4


async def test_different_keys_are_never_mixed():
    rec = Recorder()
    b = batcher(rec)
    jobs = [(k, i) for i, k in enumerate("ABABCA")]
    results = await asyncio.gather(*(b.submit(k, (k, i), cost=1) for k, i in jobs))
    assert results == [f"done {k} {i}" for k, i in jobs]
    for batch in rec.batches:
        assert len({key for key, _ in batch}) == 1
    assert sorted(len(batch) for batch in rec.batches) == [1, 2, 3]


async def test_cost_budget_closes_a_batch():
    rec = Recorder()
    b = batcher(rec, max_cost=10)
    await asyncio.gather(*(b.submit("A", ("A", i), cost=4) for i in range(5)))
    assert [len(batch) for batch in rec.batches] == [2, 2, 1]


async def test_item_budget_counts_images_not_jobs():
    rec = Recorder()
    b = batcher(rec, max_items=4)
    await asyncio.gather(*(b.submit("A", ("A", i), cost=1, size=3) for i in range(3)))
    assert [len(batch) for batch in rec.batches] == [1, 1, 1]


async def test_a_job_over_budget_still_runs_alone():
    rec = Recorder()
    b = batcher(rec, max_cost=1)
    assert await b.submit("A", ("A", 0), cost=50) == "done A 0"


async def test_a_lone_job_waits_at_most_max_wait():
    rec = Recorder()
    b = batcher(rec, max_wait_s=0.05)
    started = time.monotonic()
    await b.submit("A", ("A", 0), cost=1)
    assert time.monotonic() - started < 1.0  # bounded by max_wait, not by the idle timeout


async def test_jobs_arriving_during_a_call_form_the_next_batch():
    rec = Recorder(delay=0.2)
    b = batcher(rec, max_wait_s=0.0)
    first = asyncio.create_task(b.submit("A", ("A", 0), cost=1))
    await asyncio.sleep(0.05)
    rest = [asyncio.create_task(b.submit("A", ("A", i), cost=1)) for i in range(1, 4)]
    await asyncio.gather(first, *rest)
    assert [len(batch) for batch in rec.batches] == [1, 3]


async def test_oldest_key_goes_first():
    rec = Recorder(delay=0.1)
    b = batcher(rec, max_wait_s=0.0)
    blocker = asyncio.create_task(b.submit("X", ("X", 0), cost=1))
    await asyncio.sleep(0.02)
    b_task = asyncio.create_task(b.submit("B", ("B", 1), cost=1))
    await asyncio.sleep(0.01)
    a_task = asyncio.create_task(b.submit("A", ("A", 2), cost=1))
    await asyncio.gather(blocker, b_task, a_task)
    assert [batch[0][0] for batch in rec.batches] == ["X", "B", "A"]


async def test_errors_reach_only_their_own_callers():
    def run(items):
        return [ValueError(f"bad {n}") if n == 1 else f"ok {n}" for _, n in items]

    b = KeyedBatcher(run, BatchLimits(max_cost=100, max_items=8, max_wait_s=0.05))
    results = await asyncio.gather(*(b.submit("A", ("A", i), cost=1) for i in range(3)), return_exceptions=True)
    assert results[0] == "ok 0" and isinstance(results[1], ValueError) and results[2] == "ok 2"


async def test_a_failing_call_fails_its_whole_batch_and_the_batcher_goes_on():
    calls = []

    def run(items):
        calls.append(len(items))
        if len(calls) == 1:
            raise RuntimeError("GPU fell over")
        return ["ok"] * len(items)

    b = KeyedBatcher(run, BatchLimits(max_cost=100, max_items=8, max_wait_s=0.02))
    first = await asyncio.gather(*(b.submit("A", i, cost=1) for i in range(2)), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in first)
    assert await b.submit("A", 9, cost=1) == "ok"


async def test_a_cancelled_waiting_job_is_dropped():
    rec = Recorder(delay=0.1)
    b = batcher(rec, max_wait_s=0.0)
    blocker = asyncio.create_task(b.submit("A", ("A", 0), cost=1))
    await asyncio.sleep(0.02)
    doomed = asyncio.create_task(b.submit("B", ("B", 1), cost=1))
    await asyncio.sleep(0.01)
    doomed.cancel()
    await blocker
    with pytest.raises(asyncio.CancelledError):
        await doomed
    await asyncio.sleep(0.05)
    assert all(key != "B" for batch in rec.batches for key, _ in batch)
    assert b.queued == 0


async def test_an_idle_batcher_runs_a_lone_job_without_waiting():
    rec = Recorder()
    b = batcher(rec, max_wait_s=2.0)
    started = time.monotonic()
    await b.submit("A", ("A", 0), cost=1)
    assert time.monotonic() - started < 1.0  # far below max_wait: nobody else was expected


async def test_a_busy_batcher_waits_for_the_clients_it_just_served():
    rec = Recorder()
    b = batcher(rec, max_wait_s=2.0)
    await asyncio.gather(*(b.submit("A", ("A", i), cost=1) for i in range(3)))
    assert [len(x) for x in rec.batches] == [3]

    async def late(i: int, delay: float):
        await asyncio.sleep(delay)
        return await b.submit("A", ("A", i), cost=1)

    # Clients come back at slightly different times: the batcher waits for all three.
    await asyncio.gather(late(10, 0.0), late(11, 0.05), late(12, 0.1))
    assert [len(x) for x in rec.batches] == [3, 3]


async def test_demand_counts_jobs_that_queued_during_a_call():
    """Seven clients in a call, an eighth queued: the next batch waits for all eight."""
    rec = Recorder(delay=0.2)
    b = batcher(rec, max_wait_s=1.0)

    async def client(i: int, first_delay: float):
        await asyncio.sleep(first_delay)
        await b.submit("A", ("A", i), cost=1)
        await asyncio.sleep(0.02 * (i % 4))  # round trip back to the server, a little spread
        await b.submit("A", ("A", 100 + i), cost=1)

    await asyncio.gather(*(client(i, 0.0) for i in range(7)), client(7, 0.05))
    assert [len(x) for x in rec.batches][:2] == [7, 8]  # then the eighth client's second job

"""Continuous batching decisions, driven by a fake clock (no torch, no threads)."""

from collections.abc import Callable

import pytest
from engine_bench import FakeClock

from service.engine.messages import Handle
from service.engine.scheduler import (
    AGING,
    MAX_SLOWDOWN,
    NEAR_LEAST,
    REFRESH_STEPS,
    TRUSTED_STEPS,
    ChainScheduler,
    Job,
)
from service.engine.step_cost import StepCost


def job(n: int, steps: int, clock: FakeClock, timeout: float = 100.0) -> Job:
    return Job(n=n, steps=steps, handle=Handle(clock.now + timeout), arrived=clock.now)


def run_step(scheduler: ChainScheduler) -> tuple[list[Job], list[Job]]:
    plan = scheduler.schedule()
    return plan.running, scheduler.update_from_output(plan.running)


def test_waiting_jobs_join_running_ones_at_the_next_step() -> None:
    clock = FakeClock()
    scheduler = ChainScheduler(chain_budget=100, clock=clock)
    long = job(10, 12, clock)
    scheduler.add(long)
    for _ in range(5):
        run_step(scheduler)
    short = job(4, 3, clock)
    scheduler.add(short)
    running, _ = run_step(scheduler)
    assert running == [long, short]  # one batch: requests of similar length advance together
    finished_at = None
    for step in range(1, 10):
        _, done = run_step(scheduler)
        if short in done:
            finished_at = step
            break
    assert finished_at == 2  # the short job leaves after its own 3 steps, the long one keeps going
    assert scheduler.running == [long] and long.done_steps == 8


def test_a_short_request_beside_long_ones_steps_every_step_while_they_take_turns_beside_it() -> None:
    clock = FakeClock()
    scheduler = ChainScheduler(chain_budget=1024, clock=clock, step_budget=64)
    longs = [job(4, 1000, clock) for _ in range(16)]
    for each in longs:
        scheduler.add(each)
    for _ in range(5):
        running, _ = run_step(scheduler)
        assert running == longs  # 64 chains: all of them fit the step budget
    short = job(4, 60, clock)
    scheduler.add(short)
    before = [each.done_steps for each in longs]
    steps = 0
    while short in scheduler.running or short in scheduler.waiting:
        running, _ = run_step(scheduler)
        steps += 1
        assert short in running and sum(each.n for each in running) == 8  # the short one, and one long one
    assert steps == 60  # stepped every step: it finished as fast as alone
    turns = [each.done_steps - old for each, old in zip(longs, before, strict=True)]
    assert sorted(set(turns)) == [3, 4] and sum(turns) == 60  # the long ones took turns, evenly
    running, _ = run_step(scheduler)
    assert running == longs  # the short one gone: every long one advances again


def test_requests_of_similar_length_all_advance_together_when_the_budget_covers_them() -> None:
    clock = FakeClock()
    scheduler = ChainScheduler(chain_budget=1024, clock=clock, step_budget=64)
    jobs = []
    for _ in range(16):  # a saturated server: requests of 60 steps arriving one step apart
        jobs.append(job(4, 60, clock))
        scheduler.add(jobs[-1])
        running, _ = run_step(scheduler)
        assert running == scheduler.running + [done for done in running if done.finished]
        assert len(running) == len(jobs)  # the newest (most steps left) advances beside the oldest
    assert [each.done_steps for each in jobs] == list(range(16, 0, -1))


def test_the_step_budget_caps_a_step_and_those_who_sat_out_go_next() -> None:
    clock = FakeClock()
    scheduler = ChainScheduler(chain_budget=1024, clock=clock, step_budget=8)
    jobs = [job(4, 100, clock) for _ in range(5)]
    for each in jobs:
        scheduler.add(each)
    for _ in range(10):
        running, _ = run_step(scheduler)
        assert sum(each.n for each in running) == 8
        assert max(each.sat_out for each in jobs) <= 2
    turns = [each.done_steps for each in jobs]
    assert sum(turns) == 20 and min(turns) >= 3  # shared out: fewest steps left first, but nobody left behind


def test_a_long_request_is_not_starved_by_a_stream_of_short_ones() -> None:
    clock = FakeClock()
    scheduler = ChainScheduler(chain_budget=1024, clock=clock, step_budget=8)
    long = job(4, 100, clock)
    scheduler.add(long)
    short = job(8, 30, clock)  # fills the step budget on its own: no room for the long one beside it
    scheduler.add(short)
    steps = 0
    while not long.finished:
        if short.finished:
            short = job(8, 30, clock)
            scheduler.add(short)
        run_step(scheduler)
        steps += 1
        assert long.sat_out <= long.steps / AGING + 1  # each step sat out brings its turn nearer
    assert steps < 10 * long.steps


def test_a_long_request_steps_once_it_waited_as_long_as_the_urgent_ones_take_when_they_fill_every_step() -> None:
    clock = FakeClock()
    scheduler = ChainScheduler(chain_budget=1024, clock=clock, step_budget=8)
    long = job(4, 1000, clock)  # never urgent by its length: 1000 steps left, the shorts' horizon is 4 x 30
    scheduler.add(long)
    short = job(8, 30, clock)
    scheduler.add(short)
    for _ in range(2000):
        if short.finished:
            short = job(8, 30, clock)
            scheduler.add(short)
        run_step(scheduler)
        assert long.sat_out <= 4 * 30 + 1  # then it steps, though the shorts fill the budget
    assert long.done_steps >= 2000 // (4 * 30 + 2)


def test_the_most_urgent_job_steps_even_when_it_alone_exceeds_the_step_budget() -> None:
    clock = FakeClock()
    scheduler = ChainScheduler(chain_budget=64, clock=clock, step_budget=8)
    wide = job(32, 2, clock)
    scheduler.add(wide)
    running, _ = run_step(scheduler)
    assert running == [wide]


def test_budget_admits_first_come_first_served() -> None:
    clock = FakeClock()
    scheduler = ChainScheduler(chain_budget=10, clock=clock)
    first, second, third = job(6, 2, clock), job(6, 2, clock), job(2, 2, clock)
    for each in (first, second, third):
        scheduler.add(each)
    plan = scheduler.schedule()
    assert plan.admitted == [first]  # second does not fit; third waits behind it (no starvation)
    scheduler.update_from_output(plan.running)
    scheduler.update_from_output(scheduler.schedule().running)  # first is done after 2 steps
    assert scheduler.schedule().admitted == [second, third]


def test_cancelled_and_late_jobs_are_dropped_at_the_next_step() -> None:
    clock = FakeClock()
    scheduler = ChainScheduler(chain_budget=100, clock=clock)
    cancelled, late, fine = job(1, 50, clock), job(1, 50, clock, timeout=1.0), job(1, 50, clock)
    for each in (cancelled, late, fine):
        scheduler.add(each)
    run_step(scheduler)
    cancelled.handle.cancel()
    clock.now = 2.0
    plan = scheduler.schedule()
    assert [(dropped, reason) for dropped, reason in plan.dropped] == [(cancelled, "cancelled"), (late, "deadline")]
    assert plan.running == [fine] and scheduler.running_chains == 1


def test_a_job_that_can_never_fit_is_refused() -> None:
    scheduler = ChainScheduler(chain_budget=4, clock=FakeClock())
    try:
        scheduler.add(job(5, 1, FakeClock()))
    except ValueError as error:
        assert "chain budget of 4" in str(error)
    else:
        raise AssertionError("a 5-chain job was accepted under a budget of 4")


def test_a_windowed_scheduler_waits_for_the_window_then_runs_what_arrived_in_it() -> None:
    clock = FakeClock()
    scheduler = ChainScheduler(chain_budget=16, clock=clock, window_s=0.01)
    first = job(2, 1, clock)
    scheduler.add(first)
    clock.now = 0.004
    second = job(3, 1, clock)
    scheduler.add(second)
    assert not scheduler.has_work() and abs(scheduler.seconds_until_due() - 0.006) < 1e-9
    clock.now = 0.01
    assert scheduler.has_work() and scheduler.seconds_until_due() == 0.0
    running, done = run_step(scheduler)
    assert running == [first, second] and done == [first, second] and not scheduler.has_work()


def test_a_windowed_scheduler_runs_at_once_when_the_budget_is_full() -> None:
    clock = FakeClock()
    scheduler = ChainScheduler(chain_budget=4, clock=clock, window_s=10.0)
    scheduler.add(job(2, 1, clock))
    assert not scheduler.has_work()
    scheduler.add(job(2, 1, clock))
    assert scheduler.has_work()


def test_the_step_cost_is_a_table_of_recent_steps_joined_by_lines_read_once_two_buckets_are_measured() -> None:
    cost = StepCost()
    assert cost.seconds(8) is None and cost.points() == []
    cost.observe(64, 3.0)  # a slow first step: the median of the bucket's recent steps sets it aside
    for _ in range(10):
        cost.observe(64, 0.01 + 0.002 * 64)
        cost.observe(64, 0.0)  # a fake clock's step says nothing
    assert cost.seconds(8) is None  # one bucket: no slope to read
    cost.observe(8, 3.0)  # the first step of 8 after steps of 64 carries what they left: set aside
    assert cost.seconds(8) is None and list(cost.by_bucket()) == ["64-127"]
    cost.observe(8, 0.01 + 0.002 * 8)
    cost.observe(12, 0.01 + 0.002 * 12)  # the same bucket as 8 (8 to 15 chains): its point is their median
    assert cost.points()[0][0] == 10 and [round(at) for at, _ in cost.points()] == [10, 64]
    assert abs((cost.seconds(10) or 0) - 0.03) < 1e-9  # on a line through the points, and beyond them
    assert abs((cost.seconds(32) or 0) - (0.01 + 0.002 * 32)) < 1e-3
    assert abs((cost.seconds(1024) or 0) - (0.01 + 0.002 * 1024)) < 1e-2
    assert list(cost.by_bucket()) == ["8-15", "64-127"]


def run_timed(scheduler: ChainScheduler, seconds: Callable[[int], float]) -> tuple[list[Job], float]:
    """A step as a pool runs it: the scheduler's choice, timed by a cost model of the device."""
    plan = scheduler.schedule()
    took = seconds(sum(each.running_chains for each in plan.running))
    scheduler.cost.observe(sum(each.running_chains for each in plan.running), took)
    scheduler.update_from_output(plan.running)
    return plan.running, took


@pytest.mark.parametrize("long_steps", [1000, 300])  # 300: each long one sits out more steps than it has left
@pytest.mark.parametrize(
    ("device", "seconds"),
    [
        ("cpu", lambda chains: 0.002 + 0.01 * chains),  # every chain costs: the long ones take turns, now and then
        ("gpu", lambda chains: 0.02 + 1e-6 * chains),  # nearly flat: every long one comes along (to the budget)
    ],
)
def test_a_short_request_beside_long_ones_pays_at_most_the_slowdown_the_measured_step_cost_allows(
    device: str, seconds: Callable[[int], float], long_steps: int
) -> None:
    clock = FakeClock()
    scheduler = ChainScheduler(chain_budget=1024, clock=clock, step_budget=64)
    longs = [job(4, long_steps, clock) for _ in range(16)]
    for each in longs:
        scheduler.add(each)
    run_timed(scheduler, seconds)
    short = job(4, 60, clock)
    scheduler.add(short)
    spent, companions = 0.0, []
    while not short.finished:
        running, took = run_timed(scheduler, seconds)
        assert short in running  # it steps every step
        spent += took
        companions.append(len(running) - 1)
    assert len(companions) == 60 and companions[0] == 1  # the slope unread at first: one long one beside it
    if device == "cpu":
        assert spent <= MAX_SLOWDOWN * 60 * seconds(4) + seconds(8)  # within the slowdown, on average
        assert 10 <= sum(companions) <= 20 and max(companions) == 1  # the long ones took turns, one at a time
        turns = [each.done_steps - 1 for each in longs]
        assert max(turns) - min(turns) <= 1  # evenly
    else:
        assert companions[1:4] == [7] * 3  # three steps of 32 chains measure the bucket below the cap's, then
        assert companions[4:] == [15] * 56  # the short one and 15 long ones fill the step budget of 64
    if device == "cpu":  # the short one gone: the long ones step in the fewest chains within NEAR_LEAST a chain
        later = [sum(each.n for each in run_timed(scheduler, seconds)[0]) for _ in range(12)]
        assert later[-4:] == [4] * 4 and max(later) <= 8 and scheduler.batch == 4  # 4.7 % dearer a chain than 64
    else:
        running, _ = run_timed(scheduler, seconds)
        assert running == longs  # the short one gone: every long one advances again


def rising(chains: int) -> float:
    """A big network on a CPU: the cost per chain is least near 8 chains and rises beyond (0.058 s a chain at 8,
    0.080 at 32, 0.123 at 64, as issue 39 measured a 3 x 128² ResNet energy)."""
    return 0.134 + 0.0297 * chains + 0.00144 * chains**2


def chain_steps_per_second(scheduler: ChainScheduler, jobs: list[Job], seconds: Callable[[int], float]) -> float:
    """Run these jobs to their end, timed by `seconds`; the chain-steps they took over the time it took."""
    for each in jobs:
        scheduler.add(each)
    spent = 0.0
    while scheduler.running or scheduler.waiting:
        _, took = run_timed(scheduler, seconds)
        spent += took
    return sum(each.n * each.steps for each in jobs) / spent


def test_a_pool_whose_cost_per_chain_rises_with_the_batch_settles_on_the_least_and_concurrency_costs_nothing() -> None:
    clock = FakeClock()
    alone = chain_steps_per_second(ChainScheduler(1024, clock), [job(4, 200, clock)], rising)
    scheduler = ChainScheduler(1024, clock, step_budget=64)
    batches = []
    for each in [job(4, 200, clock) for _ in range(8)]:
        scheduler.add(each)
    while scheduler.running or scheduler.waiting:
        running, _ = run_timed(scheduler, rising)
        batches.append(sum(each.n for each in running))
    assert batches[:6] == [32, 16, 8, 4, 4, 4]  # all, then probes below (8 to 15, 4 to 7: 3 steps to trust)
    assert scheduler.batch == 8  # settled: the bucket of 8 to 15 chains costs least a chain
    settled = batches[12:-20]  # (the last steps run what is left)
    refreshes = [batch for batch in settled if batch != 8]  # the bucket below, measured again now and then
    assert set(refreshes) == {4} and len(refreshes) <= 2 * (len(settled) / REFRESH_STEPS + 1)
    together = chain_steps_per_second(
        ChainScheduler(1024, clock, step_budget=64), [job(4, 200, clock) for _ in range(8)], rising
    )
    assert together >= 1.1 * alone  # 8 at once: 8 chains a step at 0.058 s each, against 4 at 0.069
    assert 32 / rising(32) < 0.9 * alone  # all 32 in every step, as the fixed budget of 64 did, lost 14 %


@pytest.mark.parametrize(
    ("seconds", "settled"),
    [
        (lambda chains: 0.01 * chains, 4),  # flat a chain: the fewest chains a step (one request), at the same rate
        (lambda chains: 0.002 + 0.01 * chains, 4),  # a CPU's line: 4.7 % dearer a chain at 4 than at 64
        (lambda chains: 0.02 + 1e-6 * chains, 64),  # a GPU's nearly fixed cost, falling a chain: grows to the cap
    ],
    ids=["flat", "line", "falling"],
)
def test_a_step_grows_only_while_its_cost_per_chain_falls_beyond_near_least(
    seconds: Callable[[int], float], settled: int
) -> None:
    clock = FakeClock()
    scheduler = ChainScheduler(1024, clock, step_budget=64)
    jobs = [job(4, 100, clock) for _ in range(24)]  # 96 chains running, all urgent: the cap could be filled
    for each in jobs:
        scheduler.add(each)
    steps = [run_timed(scheduler, seconds) for _ in range(150)]
    batches = [sum(each.n for each in running) for running, _ in steps]
    assert batches[:2] == [64, 32]  # the cap, then a probe below (32 to 63 chains)
    later = batches[12:]  # probes done: settled, but for the bucket below measured again now and then
    assert later.count(settled) >= len(later) - 4 and max(later) <= 64 and scheduler.batch == settled
    rate = sum(later) / sum(took for _, took in steps[12:])
    assert rate >= 64 / seconds(64) / NEAR_LEAST  # chain-steps per second within NEAR_LEAST of every step full


def test_a_batch_grows_a_bucket_a_step_while_the_cost_per_chain_falls() -> None:
    clock = FakeClock()
    scheduler = ChainScheduler(1024, clock, step_budget=1024)

    def seconds(chains: int) -> float:  # a GPU's: a fixed cost that a chain barely adds to
        return 0.02 + 1e-5 * chains

    alone = job(4, 5, clock)
    scheduler.add(alone)
    while not alone.finished:
        run_timed(scheduler, seconds)  # the cost table knows 4 chains a step only
    for each in [job(4, 100, clock) for _ in range(60)]:  # 240 chains arrive
        scheduler.add(each)
    batches = [sum(each.n for each in run_timed(scheduler, seconds)[0]) for _ in range(60)]
    grown = batches.index(240)  # a bucket every few steps: each measured twice, the one below it three times
    assert grown <= 30 and set(batches[:grown]) == {8, 16, 32, 64, 128}
    assert batches[grown:].count(240) >= len(batches[grown:]) - 2  # but for the bucket below, measured again


def test_a_probe_of_fewer_chains_waits_for_a_request_that_fits_it() -> None:
    clock = FakeClock()
    scheduler = ChainScheduler(1024, clock, step_budget=64)
    wide = job(32, 50, clock)  # alone, it cannot step fewer chains: no probe below 32 while it runs alone
    scheduler.add(wide)
    batches = [sum(each.n for each in run_timed(scheduler, rising)[0]) for _ in range(5)]
    assert batches == [32] * 5 and scheduler.batch == 64
    small = job(4, 40, clock)
    scheduler.add(small)
    running, _ = run_timed(scheduler, rising)
    assert running == [small] and scheduler.batch == 16  # now one fits a probe: 4 chains cost less each than 32
    batches = [[each.n for each in run_timed(scheduler, rising)[0]] for _ in range(4)]
    assert [32] in batches and scheduler.batch == 8  # settled on 8: the wide one steps whole in its turns


def streams(chains: int) -> float:
    """Issue 37's conv energy on [1, 128, 128] on one CPU core: 4.9 ms a chain at 64 chains, 5.8 at 128."""
    return chains * (0.004 + 0.0009 * chains / 64)


def three_streams(seconds: Callable[[int, int], float]) -> tuple[list[int], ChainScheduler]:
    """Issue 37's three streams of n 64 at the default step budget (the chain budget) for 300 steps, each timed by
    `seconds(step, chains)`; the chains each step advanced."""
    clock = FakeClock()
    scheduler = ChainScheduler(1024, clock)
    for each in [job(64, 400, clock) for _ in range(3)]:
        scheduler.add(each)
    batches = []
    for step in range(300):
        running, _ = run_timed(scheduler, lambda chains, step=step: seconds(step, chains))
        batches.append(sum(each.n for each in running))
    return batches, scheduler


def load_rises(step: int, chains: int) -> float:
    """At step 100 other work comes to the shared core: every step 40 % dearer from there."""
    return (1.0 if step < 100 else 1.4) * streams(chains)


def test_a_load_that_rises_midway_never_grows_the_batch_on_a_stale_figure_past_twice_what_it_settled_on() -> None:
    batches, scheduler = three_streams(load_rises)
    settled = batches[99]
    assert batches[:2] == [192, 64] and settled == 64 and set(batches[10:100]) == {64}  # one request a step
    # 64 chains a step now read 6.9 ms a chain, more than 10 % dearer than 128's 5.8 measured ninety steps ago
    # under the lighter load; the 128 bucket is measured again (128 chains a step) before it is believed: at
    # 8.1 ms a chain it is dearer, and the batch stays at 64. The stale figure grew it to all 192 chains before.
    assert max(batches[100:]) <= 2 * settled
    assert batches[100:].count(128) <= TRUSTED_STEPS + 1 and set(batches[-150:]) == {64}
    assert scheduler.cost.by_bucket()["128-255"] == pytest.approx(1.4 * streams(128) / 128)  # its new figure only


def test_a_batch_grown_while_the_smaller_one_read_dear_comes_back_once_that_one_is_measured_again() -> None:
    def seconds(step: int, chains: int) -> float:  # a chain costs as much at 192 as at 128; 64 in a burst at first
        return (1.5 if step < 10 and chains <= 64 else 1.0) * chains * (0.004 + 0.0009 * min(chains, 128) / 64)

    batches, scheduler = three_streams(seconds)
    grown = batches.index(192, 1)  # 64 chains a step read 7.4 ms a chain in the burst, 128 read 5.8: all 192
    assert grown < 10 and set(batches[grown : REFRESH_STEPS - 1]) == {192}
    # The refresh every REFRESH_STEPS steps measures 64 again: its steps, stale, are dropped and the new one (4.9 ms)
    # is its figure. Mixed into the burst's, it read dear for two refreshes more and the batch went back to 192.
    assert set(batches[REFRESH_STEPS - 1 :]) == {64} and scheduler.batch == 64

"""Continuous batching decisions, driven by a fake clock (no torch, no threads)."""

from service.messages import Handle
from service.scheduler import ChainScheduler, Job


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def job(n: int, steps: int, clock: FakeClock, timeout: float = 100.0) -> Job:
    return Job(n=n, steps=steps, handle=Handle(clock.now + timeout), arrived=clock.now)


def run_step(scheduler: ChainScheduler) -> tuple[list[Job], list[Job]]:
    plan = scheduler.schedule()
    return plan.running, scheduler.update_from_output(plan.running)


def test_waiting_jobs_join_running_ones_at_the_next_step() -> None:
    clock = FakeClock()
    scheduler = ChainScheduler(chain_budget=100, clock=clock)
    long = job(10, 1000, clock)
    scheduler.add(long)
    for _ in range(5):
        run_step(scheduler)
    short = job(4, 3, clock)
    scheduler.add(short)
    running, _ = run_step(scheduler)
    assert running == [long, short]  # one batch: both advance together
    finished_at = None
    for step in range(1, 10):
        _, done = run_step(scheduler)
        if short in done:
            finished_at = step
            break
    assert finished_at == 2  # the short job leaves after its own 3 steps, the long one keeps going
    assert scheduler.running == [long] and long.done_steps == 8


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

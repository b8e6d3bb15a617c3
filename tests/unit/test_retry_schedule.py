"""The retry schedule of a deferred delivery and its one delay warning (zmta_queue.results)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from itertools import pairwise

import pytest
from pydantic import ValidationError

from zmta_common.config import DEFAULT_DEFER_TIMES, Bounce, Zone
from zmta_common.store import AttemptHistory
from zmta_queue.results import delay_warning_due, next_attempt

QUEUED = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)


def at(seconds: float) -> datetime:
    return QUEUED + timedelta(seconds=seconds)


def lifetime(zone: Zone, bounce: Bounce, attempt_takes: float = 0.0) -> tuple[list[datetime], list[bool]]:
    """Every attempt of a delivery that always fails softly, each ``attempt_takes`` seconds
    long, as the queue schedules it: when each failed, and whether each got the warning.
    The last failure is the one that bounced."""
    failures: list[datetime] = []
    warned: list[bool] = []
    start, last = QUEUED, None
    while True:
        now = start + timedelta(seconds=attempt_takes)
        past = AttemptHistory(len(failures), QUEUED, last)
        retry_at = next_attempt(zone, past, now)
        failures.append(now)
        if retry_at is None:
            warned.append(False)  # a bounce, not a deferral: no warning goes with it
            return failures, warned
        warned.append(delay_warning_due(bounce, past, now))
        start, last = retry_at, now


def test_the_delay_is_indexed_by_earlier_deferrals_and_counts_from_the_failure() -> None:
    zone = Zone(defer_times=[60, 120, 300], max_age=10 * 3600)
    now = at(1000)
    assert next_attempt(zone, AttemptHistory(0, QUEUED, None), now) == now + timedelta(seconds=60)
    assert next_attempt(zone, AttemptHistory(1, QUEUED, at(900)), now) == now + timedelta(seconds=120)
    assert next_attempt(zone, AttemptHistory(2, QUEUED, at(900)), now) == now + timedelta(seconds=300)


def test_out_of_retries_after_the_last_entry_of_the_schedule() -> None:
    zone = Zone(defer_times=[60, 120, 300], max_age=10 * 3600)
    assert next_attempt(zone, AttemptHistory(3, QUEUED, at(900)), at(1000)) is None
    assert next_attempt(zone, AttemptHistory(7, QUEUED, at(900)), at(1000)) is None


def test_a_next_attempt_later_than_max_age_after_queueing_bounces_instead() -> None:
    zone = Zone(defer_times=[600, 600], max_age=3600)
    # Exactly max_age after queueing is still allowed; a microsecond later is not.
    assert next_attempt(zone, AttemptHistory(0, QUEUED, None), at(3000)) == at(3600)
    assert next_attempt(zone, AttemptHistory(0, QUEUED, None), at(3000.001)) is None
    # Retries left in the schedule do not keep an old delivery alive.
    assert next_attempt(zone, AttemptHistory(1, QUEUED, at(2000)), at(3500)) is None


def test_the_default_schedule_is_the_originals_and_lasts_48_hours() -> None:
    zone, off = Zone(), Bounce()
    assert zone.defer_times == DEFAULT_DEFER_TIMES
    assert len(zone.defer_times) == 17 and zone.max_age == 48 * 3600
    failures, _ = lifetime(zone, off)
    assert len(failures) == 18  # the first attempt and 17 retries
    gaps = [round((b - a).total_seconds() / 60) for a, b in pairwise(failures)]
    assert gaps == [5, 7, 8, 25, 75, 120, *[240] * 11]
    assert failures[-1] - QUEUED == 48 * HOUR  # the last retry falls on max_age exactly


def test_slow_attempts_reach_max_age_before_the_schedule_runs_out() -> None:
    # Each attempt taking a second pushes the last retry past 48 h: it bounces one retry early.
    failures, _ = lifetime(Zone(), Bounce(), attempt_takes=1.0)
    assert len(failures) == 17
    assert failures[-1] - QUEUED < 48 * HOUR


def test_a_short_max_age_cuts_the_schedule() -> None:
    failures, _ = lifetime(Zone(max_age=3600), Bounce())
    # 5 + 7 + 8 + 25 min = 45 min; the next retry (75 min later) would be past one hour.
    assert [round((f - QUEUED).total_seconds() / 60) for f in failures] == [0, 5, 12, 20, 45]


def test_no_delay_warning_unless_it_is_switched_on() -> None:
    past = AttemptHistory(3, QUEUED, at(2 * 3600))
    assert not delay_warning_due(Bounce(), past, at(4 * 3600))
    assert delay_warning_due(Bounce(delay_warning=True), past, at(4 * 3600))


def test_the_warning_goes_with_the_failure_that_crosses_the_line() -> None:
    bounce = Bounce(delay_warning=True, delay_warning_after=3 * 3600)
    line = 3 * 3600
    assert not delay_warning_due(bounce, AttemptHistory(0, QUEUED, None), at(300))  # too early
    assert not delay_warning_due(bounce, AttemptHistory(4, QUEUED, at(line - 600)), at(line - 1))
    assert delay_warning_due(bounce, AttemptHistory(4, QUEUED, at(line - 600)), at(line))  # the line itself
    assert delay_warning_due(bounce, AttemptHistory(4, QUEUED, at(line - 600)), at(line + 3600))
    # The previous failure was on or past the line already: that one had the warning.
    assert not delay_warning_due(bounce, AttemptHistory(5, QUEUED, at(line)), at(line + 3600))
    assert not delay_warning_due(bounce, AttemptHistory(6, QUEUED, at(line + 3600)), at(line + 7200))


def test_a_first_failure_already_past_the_line_is_warned() -> None:
    # No earlier failure (held back by a future Date, or a long first attempt): queueing is "before".
    bounce = Bounce(delay_warning=True, delay_warning_after=3600)
    assert delay_warning_due(bounce, AttemptHistory(0, QUEUED, None), at(7200))


@pytest.mark.parametrize("after_hours", [0.001, 0.1, 1, 3, 10, 24, 44])
def test_exactly_one_warning_over_a_deliverys_life(after_hours: float) -> None:
    bounce = Bounce(delay_warning=True, delay_warning_after=after_hours * 3600)
    failures, warned = lifetime(Zone(), bounce)
    assert warned.count(True) == 1
    warned_at = failures[warned.index(True)]
    assert warned_at - QUEUED >= timedelta(hours=after_hours)
    earlier = failures[warned.index(True) - 1] if warned.index(True) else QUEUED
    assert earlier - QUEUED < timedelta(hours=after_hours)


@pytest.mark.parametrize("after_hours", [44.5, 47.9, 48, 49])
def test_no_warning_when_the_failure_that_crosses_the_line_is_the_bounce(after_hours: float) -> None:
    # The retries fall at 44 h and 48 h: a line after 44 h is crossed by the final failure,
    # which sends the failure DSN instead.
    bounce = Bounce(delay_warning=True, delay_warning_after=after_hours * 3600)
    _, warned = lifetime(Zone(), bounce)
    assert not any(warned)


@pytest.mark.parametrize("times", [[], [0], [300, -1]])
def test_defer_times_must_be_positive_and_not_empty(times: list) -> None:
    with pytest.raises(ValidationError, match="non-empty list of positive durations"):
        Zone(defer_times=times)


def test_max_age_and_warning_delay_must_be_positive() -> None:
    with pytest.raises(ValidationError, match="max_age"):
        Zone(max_age=0)
    with pytest.raises(ValidationError, match="delay_warning_after"):
        Bounce(delay_warning_after=0)

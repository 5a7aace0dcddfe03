"""Hypothesis drives random interleavings of Check, report, expiry and budget changes
against the real scripts on a real redis-server, and after every step compares Redis with
a model of what must hold:

- `spent + reserved <= max_budget`, at the key and at its team, unless an admin lowered a
  budget below what was already held (then nothing new is admitted until it fits again);
- `reserved` and `in_flight` are exactly the open reservations that have not expired (no
  slot or money outlives its TTL), and `in_flight` never exceeds `max_parallel_requests`;
- `spent` is exactly the sum of the reports charged, each once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from keys import keygen
from keys.budget import NO_PERIOD
from keys.budgets import BudgetSpec, BudgetStore, LevelBudget
from keys.connection import RedisBridge
from keys.model import KeyUpdate, RequestedModel, UsageReport, VirtualKey
from keys.store import KeyStore
from tests.conftest import ManualClock
from tests.helpers import key_spec

pytestmark = pytest.mark.integration
TTL_S = 900
T = TypeVar("T")
GPT4 = RequestedModel.named("gpt-4")


@dataclass
class Open:
    amount: int
    expires_ms: int


def money_machine(redis_url: str) -> type[RuleBasedStateMachine]:
    class MoneyMachine(RuleBasedStateMachine):
        """One key (budget, parallel limit) whose team has a budget too."""

        def __init__(self) -> None:
            super().__init__()
            self.loop = asyncio.new_event_loop()
            self.clock = ManualClock(1_800_000_000_000)
            self.redis = RedisBridge.from_url(redis_url, timeout_s=2)
            self.store = KeyStore(self.redis, clock=self.clock, reservation_ttl_s=TTL_S)
            self.budgets = BudgetStore(self.redis, clock=self.clock)
            self.open: dict[str, Open] = {}
            self.charged = 0
            self.reports = 0
            self.over_key = False  # an admin lowered a budget below what was held
            self.over_team = False

        def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
            return self.loop.run_until_complete(coroutine)

        def teardown(self) -> None:
            self.run(self.redis.aclose())
            self.loop.close()

        @initialize(
            budget=st.integers(1_000, 50_000),
            team_budget=st.integers(1_000, 50_000),
            parallel=st.integers(0, 4),
        )
        def create(self, budget: int, team_budget: int, parallel: int) -> None:
            self.team = f"team-{keygen.new_key_id()}"
            self.run(
                self.budgets.set(BudgetSpec("team", self.team, team_budget, NO_PERIOD, 0, 0, 0))
            )
            full, record = self.run(
                self.store.create(
                    key_spec(team_id=self.team, max_budget_nanos=budget, max_parallel=parallel),
                    "sk-mp",
                )
            )
            parsed = keygen.parse_key(full)
            assert parsed is not None
            self.key = parsed
            self.key_id = record.id
            self.parallel = parallel
            self.key_budget, self.team_budget = budget, team_budget

        def live(self) -> dict[str, Open]:
            return {i: o for i, o in self.open.items() if o.expires_ms > self.clock()}

        def fits(self, budget: int, amount: int) -> bool:
            held = self.charged + sum(o.amount for o in self.live().values())
            return held + amount <= budget and held < budget

        @rule(amount=st.integers(0, 20_000))
        def check(self, amount: int) -> None:
            """Admitted exactly when the model says every level has room (so nothing
            expired still holds money or a slot)."""
            room = self.fits(self.key_budget, amount) and self.fits(self.team_budget, amount)
            slot = not self.parallel or len(self.live()) < self.parallel
            decision = self.run(self.store.check(self.key, GPT4, reserve_nanos=amount))
            assert decision.allowed == (room and slot), decision
            if decision.allowed:
                self.open[decision.request_id] = Open(amount, self.clock() + TTL_S * 1000)

        @precondition(lambda self: bool(self.open))
        @rule(data=st.data())
        def report(self, data: st.DataObject) -> None:
            # by position, in the order they opened: the ids themselves are random
            request_id = list(self.open)[data.draw(st.integers(0, len(self.open) - 1))]
            reservation = self.open.pop(request_id)
            cost = data.draw(st.integers(0, reservation.amount))
            result = self.run(
                self.store.report_usage(
                    UsageReport(self.key_id, request_id, "gpt-4", "x", 1, 1, 2, cost)
                )
            )
            assert result.settled == (reservation.expires_ms > self.clock())
            self.charged += cost
            if not result.settled:  # it had expired: charged unreserved, like usage elsewhere
                self.note_unreserved_charge()

        @rule(data=st.data())
        def report_again_or_elsewhere(self, data: st.DataObject) -> None:
            """A duplicate of a report (charges nothing), or usage measured elsewhere."""
            request_id = f"other-{self.reports}"
            self.reports += 1
            cost = data.draw(st.integers(0, 200))
            for _ in range(2):
                self.run(
                    self.store.report_usage(
                        UsageReport(self.key_id, request_id, "gpt-4", "x", 1, 1, 2, cost)
                    )
                )
            self.charged += cost
            self.note_unreserved_charge()

        def note_unreserved_charge(self) -> None:
            """A charge no reservation held may push a level over (documented overshoot)."""
            key, team = self.read()
            self.over_key |= key.spent_nanos + key.reserved_nanos > key.max_budget_nanos
            self.over_team |= team.spent_nanos + team.reserved_nanos > team.max_budget_nanos

        @rule(seconds=st.sampled_from([1, 60, TTL_S - 1, TTL_S, TTL_S + 1]))
        def time_passes(self, seconds: int) -> None:
            self.clock.advance(seconds)

        @rule(budget=st.integers(1_000, 50_000), team_budget=st.integers(1_000, 50_000))
        def admin_changes_budgets(self, budget: int, team_budget: int) -> None:
            self.run(self.store.update(self.key_id, KeyUpdate(max_budget_nanos=budget)))
            self.run(
                self.budgets.set(BudgetSpec("team", self.team, team_budget, NO_PERIOD, 0, 0, 0))
            )
            self.key_budget, self.team_budget = budget, team_budget
            key, team = self.read()
            self.over_key = key.spent_nanos + key.reserved_nanos > budget
            self.over_team = team.spent_nanos + team.reserved_nanos > team_budget

        def read(self) -> tuple[VirtualKey, LevelBudget]:
            key = self.run(self.store.get(self.key_id))
            team = self.run(self.budgets.get("team", self.team))
            return key, team

        @invariant()
        def held_money_and_slots_are_the_open_reservations(self) -> None:
            if not hasattr(self, "key_id"):
                return
            key = self.run(self.store.get(self.key_id))
            team = self.run(self.budgets.get("team", self.team))
            live = self.live()
            held = sum(o.amount for o in live.values())
            assert (key.in_flight, key.reserved_nanos) == (len(live), held)
            assert (team.in_flight, team.reserved_nanos) == (len(live), held)
            assert key.spent_nanos == team.spent_nanos == self.charged
            if self.parallel:
                assert key.in_flight <= self.parallel

        @invariant()
        def no_level_holds_more_than_its_budget(self) -> None:
            if not hasattr(self, "key_id"):
                return
            key = self.run(self.store.get(self.key_id))
            team = self.run(self.budgets.get("team", self.team))
            if key.spent_nanos + key.reserved_nanos <= key.max_budget_nanos:
                self.over_key = False
            if team.spent_nanos + team.reserved_nanos <= team.max_budget_nanos:
                self.over_team = False
            assert self.over_key or key.spent_nanos + key.reserved_nanos <= key.max_budget_nanos
            assert self.over_team or (
                team.spent_nanos + team.reserved_nanos <= team.max_budget_nanos
            )

    return MoneyMachine


def test_random_interleavings_keep_every_level_inside_its_budget(redis_url: str) -> None:
    machine = money_machine(redis_url)
    machine.TestCase.settings = settings(
        max_examples=60,
        stateful_step_count=30,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    machine.TestCase().runTest()

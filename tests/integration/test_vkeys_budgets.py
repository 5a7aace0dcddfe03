"""`vkeys budget ...` as a real subprocess against a real server."""

from __future__ import annotations

import re
import uuid

import pytest

from keys.v1 import keys_pb2
from tests.conftest import Server
from tests.helpers import Clients, bearer
from tests.integration.test_vkeys import ok, ok_json, one_line_error, vkeys

pytestmark = pytest.mark.integration


def new_team() -> str:
    return f"cli-team-{uuid.uuid4().hex[:12]}"


def test_set_creates_a_team_budget_with_the_flags_given(server: Server) -> None:
    team = new_team()
    budget = ok_json(
        server,
        *("budget", "set", "team", team, "--max-budget", "5", "--duration", "1mo"),
        *("--rpm", "100", "--tpm", "0", "--parallel", "3"),
    )
    assert (budget["scope"], budget["id"], budget["max_budget"]) == ("team", team, 5)
    assert (budget["budget_duration"], budget["rpm_limit"], budget["tpm_limit"]) == ("1mo", 100, 0)
    assert budget["max_parallel_requests"] == 3 and budget["budget_remaining"] == 5


def test_set_on_an_existing_budget_changes_only_the_flags_given(
    server: Server, clients: Clients
) -> None:
    team = new_team()
    ok(server, "budget", "set", "team", team, "--max-budget=5", "--rpm=10", "--duration=1d")
    first = clients.budgets.GetBudget(
        keys_pb2.GetBudgetRequest(scope="team", id=team), metadata=bearer(clients.admin_token)
    )
    out = ok(server, "budget", "set", "team", team, "--tpm", "900")
    assert out.startswith(f"updated team budget {team}")
    after = clients.budgets.GetBudget(
        keys_pb2.GetBudgetRequest(scope="team", id=team), metadata=bearer(clients.admin_token)
    )
    assert (after.max_budget, after.rpm_limit, after.tpm_limit) == (5, 10, 900)
    assert after.budget_reset_at == first.budget_reset_at  # the period carries on


def test_get_prints_every_budget_field(server: Server) -> None:
    team = new_team()
    ok(server, "budget", "set", "team", team, "--max-budget", "2.5")
    out = ok(server, "budget", "get", "team", team)
    labels = {line.split()[0] for line in out.splitlines() if line.strip()}
    assert set(keys_pb2.Budget.DESCRIPTOR.fields_by_name) <= labels
    assert re.search(r"^max_budget\s+\$2\.50$", out, re.MULTILINE)
    assert re.search(r"^rpm_limit\s+unlimited$", out, re.MULTILINE)


def test_list_prints_a_table_of_the_scopes_budgets(server: Server) -> None:
    team = new_team()
    ok(server, "budget", "set", "team", team, "--max-budget", "1", "--parallel", "2")
    out = ok(server, "budget", "list", "team")
    assert out.splitlines()[0].split() == [
        "id", "spent/budget", "reserved", "in", "flight", "rpm", "tpm", "resets", "since",
    ]  # fmt: skip
    [row] = [line for line in out.splitlines() if line.startswith(team)]
    assert row.split()[1:4] == ["$0.00/$1.00", "$0.00", "0/2"]


def test_list_json_is_the_list_budgets_response(server: Server) -> None:
    team = new_team()
    ok(server, "budget", "set", "team", team)
    reply = ok_json(server, "budget", "list", "team")
    assert team in [b["id"] for b in reply["budgets"]]


def test_delete_then_get_is_a_one_line_not_found(server: Server) -> None:
    team = new_team()
    ok(server, "budget", "set", "team", team)
    assert ok(server, "budget", "delete", "team", team).strip() == f"deleted team budget {team}"
    line = one_line_error(vkeys(server, "budget", "get", "team", team), "NOT_FOUND")
    assert team in line


def test_an_invalid_value_is_a_one_line_invalid_argument(server: Server) -> None:
    result = vkeys(server, "budget", "set", "user", "u1", "--duration", "weekly")
    assert "budget_duration" in one_line_error(result, "INVALID_ARGUMENT")


def test_an_unknown_scope_is_refused_before_any_call(server: Server) -> None:
    result = vkeys(server, "budget", "get", "org", "acme")
    assert result.returncode == 2
    assert "invalid choice: 'org'" in result.stderr

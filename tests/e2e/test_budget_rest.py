"""/api/budgets through Envoy's grpc_json_transcoder to BudgetService, as a client sends it."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from devstack.mock_upstream import MockUpstream
from tests.conftest import Envoy, Server
from tests.e2e.test_rest_api import api
from tests.helpers import HttpReply

pytestmark = pytest.mark.e2e

# The body docs/interface.md shows.
BODY: dict[str, Any] = {
    "max_budget": 5,
    "budget_duration": "1mo",
    "rpm_limit": 100,
    "tpm_limit": 0,
    "max_parallel_requests": 3,
}


def new_team() -> str:
    return f"team-{uuid.uuid4().hex[:12]}"


def call(
    envoy: Envoy, server: Server, method: str, path: str, body: dict[str, Any] | None = None
) -> HttpReply:
    """As admin, unscoped (no x-user-id)."""
    return api(envoy, method, path, server.admin_token, body, user=None)


def put(envoy: Envoy, server: Server, team: str, body: dict[str, Any] | None = None) -> HttpReply:
    return call(envoy, server, "PUT", f"/api/budgets/team/{team}", BODY if body is None else body)


def test_put_sets_a_team_budget(envoy: Envoy, server: Server) -> None:
    team = new_team()
    reply = put(envoy, server, team)
    assert reply.status == 200, reply.body
    assert reply.headers["content-type"] == "application/json"
    budget = reply.json()
    assert {k: budget[k] for k in BODY} == BODY
    assert (budget["scope"], budget["id"]) == ("team", team)
    # proto field names; int64 as a string; zero values printed
    assert (budget["spent"], budget["reserved"], budget["in_flight"]) == (0, 0, "0")
    assert budget["budget_remaining"] == 5
    assert budget["created_at"] and budget["budget_reset_at"]


def test_get_reads_a_budget(envoy: Envoy, server: Server) -> None:
    team = new_team()
    stored = put(envoy, server, team).json()
    reply = call(envoy, server, "GET", f"/api/budgets/team/{team}")
    assert reply.status == 200
    assert reply.json() == stored


def test_get_of_a_scope_lists_its_budgets(envoy: Envoy, server: Server) -> None:
    team = new_team()
    put(envoy, server, team)
    reply = call(envoy, server, "GET", "/api/budgets/team")
    assert reply.status == 200
    assert team in [b["id"] for b in reply.json()["budgets"]]


def test_delete_removes_a_budget(envoy: Envoy, server: Server) -> None:
    team = new_team()
    put(envoy, server, team)
    reply = call(envoy, server, "DELETE", f"/api/budgets/team/{team}")
    assert reply.status == 200
    assert reply.json() == {"scope": "team", "id": team}
    assert call(envoy, server, "GET", f"/api/budgets/team/{team}").status == 404


def test_missing_budget_is_404(envoy: Envoy, server: Server) -> None:
    reply = call(envoy, server, "GET", f"/api/budgets/team/{new_team()}")
    assert reply.status == 404
    assert reply.json()["code"] == 5  # NOT_FOUND


def test_unknown_scope_is_400(envoy: Envoy, server: Server) -> None:
    reply = call(envoy, server, "PUT", "/api/budgets/org/acme", BODY)
    assert reply.status == 400
    assert reply.json()["code"] == 3 and '"user" or "team"' in reply.json()["message"]


def test_unknown_body_field_is_400_naming_it_and_sets_nothing(envoy: Envoy, server: Server) -> None:
    team = new_team()
    reply = put(envoy, server, team, {**BODY, "rpm_limitt": 1})
    assert reply.status == 400
    assert reply.json()["code"] == 3 and "rpm_limitt" in reply.json()["message"]
    assert call(envoy, server, "GET", f"/api/budgets/team/{team}").status == 404


def test_a_field_that_cannot_be_set_is_400_naming_it(envoy: Envoy, server: Server) -> None:
    reply = put(envoy, server, new_team(), {**BODY, "spent": 0})
    assert reply.status == 400
    assert "cannot be set: spent" in reply.json()["message"]


def test_a_value_of_the_wrong_json_type_is_400_naming_it(envoy: Envoy, server: Server) -> None:
    reply = put(envoy, server, new_team(), {**BODY, "rpm_limit": "100"})
    assert reply.status == 400
    assert "rpm_limit must be a number" in reply.json()["message"]


def test_lower_camel_case_names_are_read_as_in_proto3_json(envoy: Envoy, server: Server) -> None:
    reply = put(envoy, server, new_team(), {"maxBudget": 2, "maxParallelRequests": 4})
    assert reply.status == 200, reply.body
    assert (reply.json()["max_budget"], reply.json()["max_parallel_requests"]) == (2, 4)


def test_put_replaces_the_whole_configuration(envoy: Envoy, server: Server) -> None:
    team = new_team()
    put(envoy, server, team)
    reply = put(envoy, server, team, {"max_budget": 7})
    assert reply.status == 200
    changed = reply.json()
    assert (changed["max_budget"], changed["rpm_limit"], changed["budget_duration"]) == (7, 0, "")


def test_invalid_value_is_400(envoy: Envoy, server: Server) -> None:
    reply = put(envoy, server, new_team(), {**BODY, "max_budget": -1})
    assert reply.status == 400
    assert reply.json()["code"] == 3 and "max_budget" in reply.json()["message"]


def test_missing_admin_token_is_401_and_never_reaches_upstream(
    envoy: Envoy, upstream: MockUpstream
) -> None:
    before = len(upstream.seen)
    reply = api(envoy, "GET", "/api/budgets/team", None, user=None)
    assert reply.status == 401
    assert reply.json()["code"] == 16  # UNAUTHENTICATED
    assert len(upstream.seen) == before


def test_a_call_with_x_user_id_may_not_set_a_budget(envoy: Envoy, server: Server) -> None:
    reply = api(envoy, "PUT", "/api/budgets/user/user_123", server.admin_token, BODY)
    assert reply.status == 403
    assert reply.json()["code"] == 7  # PERMISSION_DENIED

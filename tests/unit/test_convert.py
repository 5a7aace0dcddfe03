"""Requests -> domain values: the REST PATCH body and the one validation path that CreateKey
and UpdateKey share."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf.struct_pb2 import Struct

from extauthz import convert
from extauthz.settings import Settings
from keys import validation
from keys.errors import InvalidArgument
from keys.v1 import keys_pb2

pytestmark = pytest.mark.unit

SETTINGS = Settings.from_env({"VIRTUAL_KEY_MAX_EXPIRES_DAYS": "90"})
NOW = 1_800_000_000_000


def patch(body: dict[str, Any], metadata: dict[str, str] | None = None) -> Any:
    return convert.key_fields_from_json(body, metadata)


def test_patch_takes_the_shapes_create_key_takes() -> None:
    sent = patch({"allowed_models": ["gpt-4"], "rpm_limit": 7, "max_budget": 2.5, "name": "n"})
    assert sent.allowed_models == ["gpt-4"] and sent.rpm_limit == 7
    assert sent.max_budget == 2.5 and sent.name == "n"
    assert sent.sent() == ["name", "allowed_models", "max_budget", "rpm_limit"]


def test_patch_takes_lower_camel_case_names_as_proto_json_does() -> None:
    assert patch({"rpmLimit": 7}).rpm_limit == 7


def test_patch_with_an_unknown_field_names_it() -> None:
    with pytest.raises(InvalidArgument, match='unknown fields: "rpm_limitt"'):
        patch({"rpm_limitt": 7, "name": "n"})


@pytest.mark.parametrize("field", ["id", "user_id", "team_id", "spent", "created_at", "status"])
def test_patch_of_a_field_that_cannot_change_names_it(field: str) -> None:
    with pytest.raises(InvalidArgument, match=f"fields that cannot be changed: {field}"):
        patch({field: "x", "rpm_limit": 7})


def test_patch_error_never_echoes_unbounded_names() -> None:
    names = {"x" * 10_000 + str(i): 1 for i in range(50)}
    with pytest.raises(InvalidArgument) as err:
        patch(names)
    assert len(str(err.value)) < 1500 and "and 40 more" in str(err.value)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"allowed_models": {"models": ["gpt-4"]}}, "allowed_models must be a list of strings"),
        ({"rpm_limit": 7.5}, "rpm_limit must be a whole number"),
        ({"rpm_limit": True}, "rpm_limit must be a number"),
        ({"max_budget": "5"}, "max_budget must be a number"),
        ({"name": None}, "name must be a string"),
        ({"metadata": {"env": 1}}, "metadata must be an object of strings"),
    ],
)
def test_patch_value_of_the_wrong_json_type_is_refused(body: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        patch(body)


def test_patch_metadata_merges_and_null_removes_an_entry() -> None:
    sent = patch({"metadata": {"env": "prod", "old": None}}, {"team": "a", "old": "x"})
    assert sent.metadata == {"team": "a", "env": "prod"}


def update_request(**typed: Any) -> keys_pb2.UpdateKeyRequest:
    return keys_pb2.UpdateKeyRequest(id="0123456789abcdef", **typed)


def create_request(body: dict[str, Any]) -> keys_pb2.CreateKeyRequest:
    """CreateKey as Envoy sends a REST POST: the JSON body in `spec`."""
    spec = Struct()
    spec.update(body)
    return keys_pb2.CreateKeyRequest(spec=spec)


def create_spec(request: keys_pb2.CreateKeyRequest) -> Any:
    new = convert.new_key(request)
    return convert.key_spec(new, SETTINGS, NOW, new.user_id or "u")


EVERY_CREATE_FIELD: dict[str, Any] = {
    "name": "n",
    "user_id": "u",
    "team_id": "t",
    "expires_days": 30,
    "allowed_models": ["gpt-4", "claude-3-opus"],
    "max_budget": 2.5,
    "tpm_limit": 1000,
    "rpm_limit": 60,
    "metadata": {"env": "prod"},
    "budget_duration": "30d",
}


def test_create_from_spec_builds_the_key_the_typed_fields_build() -> None:
    typed = keys_pb2.CreateKeyRequest(**EVERY_CREATE_FIELD)
    assert create_spec(create_request(EVERY_CREATE_FIELD)) == create_spec(typed)


def test_create_from_spec_takes_lower_camel_case_names_as_proto_json_does() -> None:
    assert create_spec(create_request({"name": "n", "rpmLimit": 7, "userId": "v"})).rpm_limit == 7


def test_create_with_an_unknown_field_names_it() -> None:
    with pytest.raises(InvalidArgument, match='unknown fields: "rpm_limitt"; fields a new key'):
        convert.new_key(create_request({"name": "n", "user_id": "u", "rpm_limitt": 1}))


def test_create_error_never_echoes_unbounded_names() -> None:
    names = {"x" * 10_000 + str(i): 1 for i in range(50)}
    with pytest.raises(InvalidArgument) as err:
        convert.new_key(create_request(names))
    assert len(str(err.value)) < 1500 and "and 40 more" in str(err.value)


def test_create_with_spec_and_typed_fields_together_is_refused() -> None:
    request = create_request({"name": "n"})
    request.rpm_limit = 5
    with pytest.raises(InvalidArgument, match=r"not both \(fields: rpm_limit\)"):
        convert.new_key(request)


def test_create_from_spec_without_a_name_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="name is required"):
        create_spec(create_request({"user_id": "u"}))


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"allowed_models": "gpt-4"}, "allowed_models must be a list of strings"),
        ({"rpm_limit": "60"}, "rpm_limit must be a number"),
        ({"tpm_limit": 1.5}, "tpm_limit must be a whole number"),
        ({"user_id": 7}, "user_id must be a string"),
        ({"team_id": None}, "team_id must be a string"),
        ({"metadata": {"env": None}}, "metadata must be an object of strings"),
        ({"metadata": ["env"]}, "metadata must be an object of strings"),
    ],
)
def test_create_value_of_the_wrong_json_type_is_refused(body: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        convert.new_key(create_request({"name": "n", **body}))


def test_update_from_patch_leaves_unsent_fields_alone() -> None:
    body = Struct()
    body.update({"rpm_limit": 7})
    change, changed = convert.key_update(update_request(patch=body), SETTINGS, NOW, {"a": "b"})
    assert change.rpm_limit == 7 and changed == ["rpm_limit"]
    assert change.metadata is None and change.allowed_models is None and change.name is None


def test_update_with_patch_and_typed_fields_together_is_refused() -> None:
    body = Struct()
    body.update({"rpm_limit": 7})
    with pytest.raises(InvalidArgument, match="not both"):
        convert.key_update(update_request(patch=body, tpm_limit=3), SETTINGS, NOW, {})


@pytest.mark.parametrize(
    ("typed", "message"),
    [
        ({"max_budget": -1.0}, "max_budget must be a number of USD"),
        ({"rpm_limit": -5}, "rpm_limit must be from 0"),
        ({"tpm_limit": -5}, "tpm_limit must be from 0"),
        ({"expires_days": 91}, "expires_days must be from 1 to 90"),
        ({"name": "  "}, "name is required"),
        ({"budget_duration": "7w"}, "budget_duration"),
    ],
)
def test_create_typed_update_and_patch_refuse_a_field_by_the_same_rule(
    typed: dict[str, Any], message: str
) -> None:
    create = keys_pb2.CreateKeyRequest(name="n", user_id="u")
    for name, value in typed.items():
        setattr(create, name, value)
    with pytest.raises(InvalidArgument, match=message) as from_create:
        create_spec(create)
    with pytest.raises(InvalidArgument) as from_spec:
        create_spec(create_request({"name": "n", "user_id": "u", **typed}))
    with pytest.raises(InvalidArgument) as from_update:
        convert.key_update(update_request(**typed), SETTINGS, NOW, {})
    body = Struct()
    body.update(typed)
    with pytest.raises(InvalidArgument) as from_patch:
        convert.key_update(update_request(patch=body), SETTINGS, NOW, {})
    assert str(from_create.value) == str(from_spec.value)
    assert str(from_create.value) == str(from_update.value) == str(from_patch.value)


def test_create_fills_in_the_environment_defaults() -> None:
    spec = create_spec(keys_pb2.CreateKeyRequest(name="n"))
    assert (spec.rpm_limit, spec.tpm_limit) == (SETTINGS.default_rpm, SETTINGS.default_tpm)
    assert spec.max_budget_nanos == SETTINGS.default_budget_nanos
    assert spec.expires_at_ms == NOW + 90 * 86_400_000 and spec.allowed_models == ("*",)


def test_patch_typo_lists_only_the_fields_that_can_change() -> None:
    with pytest.raises(InvalidArgument) as raised:
        convert.key_fields_from_json({"rpm_limt": 30})
    offered = str(raised.value).split("fields that can change: ")[1]
    assert "rpm_limit" in offered
    assert "user_id" not in offered and "spent" not in offered and "id," not in offered


def test_patch_may_send_the_keys_own_id_back() -> None:
    fields = convert.key_fields_from_json({"id": "a" * 16, "rpm_limit": 31}, key_id="a" * 16)
    assert fields.rpm_limit == 31
    with pytest.raises(InvalidArgument, match="cannot be changed: id"):
        convert.key_fields_from_json({"id": "b" * 16}, key_id="a" * 16)


def test_patch_with_an_empty_model_list_is_refused_not_read_as_every_model() -> None:
    fields = convert.key_fields_from_json({"allowed_models": []})
    with pytest.raises(InvalidArgument, match=r'send \["\*"\]'):
        validation.key_changes(fields, max_expires_days=30, now_ms=0)

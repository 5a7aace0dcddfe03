"""keys.v1.KeyService: thin mapping between the protos and the domain."""

from __future__ import annotations

import logging

import grpc

from extauthz import convert
from extauthz.access import Context, readable_key, require_admin, scoped
from extauthz.auth import metadata_value
from extauthz.errors import rpc_errors
from extauthz.settings import Settings
from keys import validation
from keys.budget import parse_duration
from keys.errors import InvalidArgument
from keys.keygen import parse_key
from keys.model import KeySpec, KeyUpdate, Reason, Status
from keys.store import KeyStore
from keys.v1 import keys_pb2, keys_pb2_grpc

log = logging.getLogger("extauthz.admin")
DAY_MS = 86_400_000


def _status(value: str) -> Status | None:
    if not value:
        return None
    try:
        return Status(value)
    except ValueError:
        raise InvalidArgument("status must be active, revoked or expired") from None


class KeyService(keys_pb2_grpc.KeyServiceServicer):
    def __init__(self, store: KeyStore, settings: Settings) -> None:
        self.store = store
        self.settings = settings

    async def _changeable(self, context: Context, raw_id: str) -> str:
        """The id of an existing key the admin caller may change (x-user-id scoped)."""
        user = await require_admin(context, self.settings)
        key_id = validation.key_id("id", raw_id)
        scoped(await self.store.get(key_id), user)
        return key_id

    def _audit(self, context: Context, action: str, key_id: str, **fields: object) -> None:
        """Who (the admin token's holder, from this peer, acting for x-user-id if sent),
        what, which key. Never a token or a key."""
        log.info(
            action,
            extra={
                "action": action,
                "key_id": key_id,
                "actor": "admin",
                "on_behalf_of": metadata_value(context, "x-user-id"),
                "peer": context.peer(),
                **fields,
            },
        )

    @rpc_errors
    async def CreateKey(
        self, request: keys_pb2.CreateKeyRequest, context: Context
    ) -> keys_pb2.CreateKeyResponse:
        user = await require_admin(context, self.settings)
        s = self.settings
        user_id = request.user_id or (user or "")
        if user is not None and user_id != user:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED, "user_id must equal the x-user-id of the call"
            )
        now = self.store.clock()
        days = validation.expires_days(
            request.expires_days if request.HasField("expires_days") else None,
            s.max_expires_days,
        )
        spec = KeySpec(
            name=validation.text("name", request.name, required=True, max_chars=256),
            user_id=validation.text("user_id", user_id, required=True, max_chars=128),
            team_id=validation.text("team_id", request.team_id, required=False, max_chars=128),
            expires_at_ms=now + days * DAY_MS,
            allowed_models=validation.models(request.allowed_models),
            max_budget_nanos=validation.budget("max_budget", request.max_budget)
            if request.HasField("max_budget")
            else s.default_budget_nanos,
            tpm_limit=validation.limit("tpm_limit", request.tpm_limit)
            if request.HasField("tpm_limit")
            else s.default_tpm,
            rpm_limit=validation.limit("rpm_limit", request.rpm_limit)
            if request.HasField("rpm_limit")
            else s.default_rpm,
            metadata=validation.metadata(request.metadata),
            budget=parse_duration(request.budget_duration),
        )
        full_key, key = await self.store.create(spec, s.key_prefix)
        self._audit(context, "key created", key.id, user_id=key.user_id)
        return keys_pb2.CreateKeyResponse(key=full_key, key_data=convert.key_data(key, now))

    @rpc_errors
    async def GetKey(self, request: keys_pb2.GetKeyRequest, context: Context) -> keys_pb2.KeyData:
        key_id = validation.key_id("id", request.id)
        key = await readable_key(context, self.settings, self.store, key_id)
        return convert.key_data(key, self.store.clock())

    @rpc_errors
    async def ListKeys(
        self, request: keys_pb2.ListKeysRequest, context: Context
    ) -> keys_pb2.ListKeysResponse:
        user = await require_admin(context, self.settings)
        if user is not None and request.user_id and request.user_id != user:
            return keys_pb2.ListKeysResponse()  # another user's keys: none visible
        page = await self.store.list_keys(
            user_id=user if user is not None else request.user_id,
            team_id=request.team_id,
            status=_status(request.status),
            page_size=validation.page_size(request.page_size),
            page_token=request.page_token,
        )
        now = self.store.clock()
        return keys_pb2.ListKeysResponse(
            keys=[convert.key_data(k, now) for k in page.keys], next_page_token=page.next_token
        )

    @rpc_errors
    async def UpdateKey(
        self, request: keys_pb2.UpdateKeyRequest, context: Context
    ) -> keys_pb2.KeyData:
        key_id = await self._changeable(context, request.id)
        now = self.store.clock()
        has = request.HasField
        change = KeyUpdate(
            name=validation.text("name", request.name, required=True, max_chars=256)
            if has("name")
            else None,
            allowed_models=validation.models(request.allowed_models.models)
            if has("allowed_models")
            else None,
            max_budget_nanos=validation.budget("max_budget", request.max_budget)
            if has("max_budget")
            else None,
            tpm_limit=validation.limit("tpm_limit", request.tpm_limit)
            if has("tpm_limit")
            else None,
            rpm_limit=validation.limit("rpm_limit", request.rpm_limit)
            if has("rpm_limit")
            else None,
            expires_at_ms=now
            + validation.expires_days(request.expires_days, self.settings.max_expires_days) * DAY_MS
            if has("expires_days")
            else None,
            metadata=validation.metadata(request.metadata.entries) if has("metadata") else None,
            budget=parse_duration(request.budget_duration) if has("budget_duration") else None,
        )
        key = await self.store.update(key_id, change)
        changed = [f.name for f, _ in request.ListFields() if f.name != "id"]
        self._audit(context, "key updated", key_id, fields=changed)
        return convert.key_data(key, now)

    @rpc_errors
    async def RevokeKey(
        self, request: keys_pb2.RevokeKeyRequest, context: Context
    ) -> keys_pb2.KeyData:
        key_id = await self._changeable(context, request.id)
        key = await self.store.revoke(key_id)
        self._audit(context, "key revoked", key_id)
        return convert.key_data(key, self.store.clock())

    @rpc_errors
    async def RotateKey(
        self, request: keys_pb2.RotateKeyRequest, context: Context
    ) -> keys_pb2.CreateKeyResponse:
        key_id = await self._changeable(context, request.id)
        grace = validation.grace_seconds(request.grace_seconds)
        full_key, key = await self.store.rotate(key_id, self.settings.key_prefix, grace * 1000)
        self._audit(context, "key rotated", key_id, grace_seconds=grace)
        return keys_pb2.CreateKeyResponse(
            key=full_key, key_data=convert.key_data(key, self.store.clock())
        )

    @rpc_errors
    async def DeleteKey(
        self, request: keys_pb2.DeleteKeyRequest, context: Context
    ) -> keys_pb2.DeleteKeyResponse:
        key_id = await self._changeable(context, request.id)
        await self.store.delete(key_id)
        self._audit(context, "key deleted", key_id)
        return keys_pb2.DeleteKeyResponse(id=key_id)

    @rpc_errors
    async def ValidateKey(
        self, request: keys_pb2.ValidateKeyRequest, context: Context
    ) -> keys_pb2.ValidateKeyResponse:
        """The key in the request is the credential: no admin token needed."""
        parsed = parse_key(request.key.strip())
        if parsed is None:
            return keys_pb2.ValidateKeyResponse(valid=False, error=Reason.INVALID_API_KEY.value)
        reason, record = await self.store.validate(parsed)
        response = keys_pb2.ValidateKeyResponse(
            valid=reason is Reason.OK,
            key_id=parsed.key_id,
            error="" if reason is Reason.OK else reason.value,
        )
        # a revoked or expired key learns that much, not its data (as with GetKey)
        if record is not None and reason not in (Reason.KEY_REVOKED, Reason.KEY_EXPIRED):
            now = self.store.clock()
            rpm, tpm = record.windows(now)
            response.key_data.CopyFrom(convert.key_data(record, now))
            response.rate_limit_info.rpm.CopyFrom(convert.window_usage(rpm))
            response.rate_limit_info.tpm.CopyFrom(convert.window_usage(tpm))
        return response

"""keys.v1.KeyService: thin mapping between the protos and the domain."""

from __future__ import annotations

import logging

import grpc

from extauthz import convert
from extauthz.auth import Role, bearer, bearer_key, metadata_value, role_of
from extauthz.errors import rpc_errors
from extauthz.settings import Settings
from keys import validation
from keys.errors import NotFound
from keys.keygen import parse_key
from keys.model import KeySpec, Reason, VirtualKey
from keys.store import KeyStore
from keys.v1 import keys_pb2, keys_pb2_grpc

log = logging.getLogger("extauthz.admin")
Context = grpc.aio.ServicerContext[object, object]
DAY_MS = 86_400_000


class KeyService(keys_pb2_grpc.KeyServiceServicer):
    def __init__(self, store: KeyStore, settings: Settings) -> None:
        self.store = store
        self.settings = settings

    async def _require_admin(self, context: Context) -> str | None:
        """Aborts unless the admin token is presented; returns the x-user-id scope, if any."""
        role = role_of(bearer(context), self.settings.admin_token, "")
        if role is not Role.ADMIN:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "admin token required")
        return metadata_value(context, "x-user-id")

    def _scoped(self, key: VirtualKey, user: str | None) -> VirtualKey:
        if user is not None and key.user_id != user:
            raise NotFound(f"key {key.id} not found")
        return key

    @rpc_errors
    async def CreateKey(
        self, request: keys_pb2.CreateKeyRequest, context: Context
    ) -> keys_pb2.CreateKeyResponse:
        user = await self._require_admin(context)
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
            max_budget_nanos=validation.usd("max_budget", request.max_budget)
            if request.HasField("max_budget")
            else s.default_budget_nanos,
            tpm_limit=validation.limit("tpm_limit", request.tpm_limit)
            if request.HasField("tpm_limit")
            else s.default_tpm,
            rpm_limit=validation.limit("rpm_limit", request.rpm_limit)
            if request.HasField("rpm_limit")
            else s.default_rpm,
            metadata=validation.metadata(request.metadata),
        )
        full_key, key = await self.store.create(spec, s.key_prefix)
        log.info("key created", extra={"key_id": key.id, "user_id": key.user_id})
        return keys_pb2.CreateKeyResponse(key=full_key, key_data=convert.key_data(key, now))

    @rpc_errors
    async def GetKey(self, request: keys_pb2.GetKeyRequest, context: Context) -> keys_pb2.KeyData:
        key_id = validation.key_id("id", request.id)
        own = bearer_key(context)
        if own is not None and own.key_id == key_id:
            # self-service: an active key may read itself
            reason, record = await self.store.validate(own)
            if record is None or reason in (
                Reason.INVALID_API_KEY,
                Reason.KEY_REVOKED,
                Reason.KEY_EXPIRED,
            ):
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, "key is not active")
            assert record is not None
            return convert.key_data(record, self.store.clock())
        user = await self._require_admin(context)
        key = self._scoped(await self.store.get(key_id), user)
        return convert.key_data(key, self.store.clock())

    @rpc_errors
    async def RevokeKey(
        self, request: keys_pb2.RevokeKeyRequest, context: Context
    ) -> keys_pb2.KeyData:
        user = await self._require_admin(context)
        key_id = validation.key_id("id", request.id)
        self._scoped(await self.store.get(key_id), user)
        key = await self.store.revoke(key_id)
        log.info("key revoked", extra={"key_id": key_id})
        return convert.key_data(key, self.store.clock())

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
        if record is not None:
            now = self.store.clock()
            rpm, tpm = record.windows(now)
            response.key_data.CopyFrom(convert.key_data(record, now))
            response.rate_limit_info.rpm.CopyFrom(convert.window_usage(rpm))
            response.rate_limit_info.tpm.CopyFrom(convert.window_usage(tpm))
        return response

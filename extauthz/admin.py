"""keys.v1.KeyService: thin mapping between the protos and the domain."""

from __future__ import annotations

import logging

from extauthz import convert
from extauthz.access import (
    Context,
    listable_user,
    owner_of_new_key,
    readable_key,
    require_admin,
    scoped,
)
from extauthz.auth import metadata_value
from extauthz.errors import rpc_errors
from extauthz.settings import Settings
from keys import validation
from keys.errors import InvalidArgument
from keys.keygen import parse_key
from keys.model import Reason, Status, VirtualKey
from keys.store import KeyStore
from keys.v1 import keys_pb2, keys_pb2_grpc

log = logging.getLogger("extauthz.admin")


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

    async def _changeable(self, context: Context, raw_id: str) -> VirtualKey:
        """An existing key the admin caller may change (x-user-id scoped)."""
        user = await require_admin(context, self.settings)
        key_id = validation.key_id("id", raw_id)
        return scoped(await self.store.get(key_id), user)

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
        sent = convert.new_key(request)
        owner = await owner_of_new_key(context, user, sent.user_id)
        now = self.store.clock()
        spec = convert.key_spec(sent, self.settings, now, owner)
        full_key, key = await self.store.create(spec, self.settings.key_prefix)
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
        user_id = listable_user(user, request.user_id)
        if user_id is None:
            return keys_pb2.ListKeysResponse()  # another user's keys: none visible
        page = await self.store.list_keys(
            user_id=user_id,
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
        current = await self._changeable(context, request.id)
        key_id = current.id
        now = self.store.clock()
        change, changed = convert.key_update(request, self.settings, now, current.metadata)
        key = await self.store.update(key_id, change)
        self._audit(context, "key updated", key_id, fields=changed)
        return convert.key_data(key, now)

    @rpc_errors
    async def RevokeKey(
        self, request: keys_pb2.RevokeKeyRequest, context: Context
    ) -> keys_pb2.KeyData:
        key_id = (await self._changeable(context, request.id)).id
        key = await self.store.revoke(key_id)
        self._audit(context, "key revoked", key_id)
        return convert.key_data(key, self.store.clock())

    @rpc_errors
    async def RotateKey(
        self, request: keys_pb2.RotateKeyRequest, context: Context
    ) -> keys_pb2.CreateKeyResponse:
        key_id = (await self._changeable(context, request.id)).id
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
        key_id = (await self._changeable(context, request.id)).id
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

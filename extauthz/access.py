"""Who may touch which key: the admin token (optionally scoped by `x-user-id`), or an
active virtual key reading itself."""

from __future__ import annotations

import grpc

from extauthz.auth import Role, bearer, bearer_key, metadata_value, role_of
from extauthz.settings import Settings
from keys.errors import InvalidArgument, NotFound
from keys.model import Reason, VirtualKey
from keys.store import KeyStore

Context = grpc.aio.ServicerContext[object, object]


async def require_admin(context: Context, settings: Settings) -> str | None:
    """Aborts unless the admin token is presented; returns the x-user-id scope, if any."""
    if role_of(bearer(context), settings.admin_token, "") is not Role.ADMIN:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "admin token required")
    return user_scope(context)


def user_scope(context: Context) -> str | None:
    """The x-user-id scope; an empty one is refused rather than read as "everyone"."""
    user = metadata_value(context, "x-user-id")
    if user is not None and not user.strip():
        raise InvalidArgument("x-user-id is empty")
    return user


def scoped(key: VirtualKey, user: str | None) -> VirtualKey:
    """Another user's key reads as missing."""
    if user is not None and key.user_id != user:
        raise NotFound(f"key {key.id} not found")
    return key


async def readable_key(
    context: Context, settings: Settings, store: KeyStore, key_id: str
) -> VirtualKey:
    """The key, if the caller may read it: itself (while active), or the admin."""
    own = bearer_key(context)
    if own is not None and own.key_id == key_id:
        reason, record = await store.validate(own)
        if record is None or reason in (
            Reason.INVALID_API_KEY,
            Reason.KEY_REVOKED,
            Reason.KEY_EXPIRED,
        ):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "key is not active")
        assert record is not None
        return record
    user = await require_admin(context, settings)
    return scoped(await store.get(key_id), user)

"""Who may call what, and on which keys: every caller policy of KeyService, UsageService
and BudgetService.

The admin token (optionally scoped to one user by `x-user-id`), the usage token (ReportUsage
only), or an active virtual key reading itself. A refusal says what was wrong with the
credential (missing, not a bearer token, wrong), never the credential itself.
"""

from __future__ import annotations

from typing import NoReturn

import grpc

from extauthz.auth import Role, bearer, bearer_key, metadata_value, metadata_values, role_of
from extauthz.settings import Settings
from keys.errors import InvalidArgument, NotFound
from keys.model import Reason, VirtualKey
from keys.store import KeyStore

Context = grpc.aio.ServicerContext[object, object]


async def _refuse(context: Context, token: str | None, wanted: str) -> NoReturn:
    """UNAUTHENTICATED, saying which of missing / malformed / wrong it was."""
    if metadata_value(context, "authorization") is None:
        why = f"{wanted} missing: send authorization: Bearer <token>"
    elif token is None:
        why = f"{wanted} missing: the authorization header must be 'Bearer <token>'"
    else:
        why = f"{wanted} is wrong"
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, why)


async def require_admin(context: Context, settings: Settings) -> str | None:
    """Aborts unless the admin token is presented; returns the x-user-id scope, if any."""
    token = bearer(context)
    if role_of(token, settings.admin_token, "") is not Role.ADMIN:
        if not settings.admin_token and token is not None:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "admin calls are refused: the server has no EXTAUTHZ_ADMIN_TOKEN",
            )
        await _refuse(context, token, "admin token")
    return user_scope(context)


async def check_budget_scope(
    context: Context, user: str | None, reads: tuple[str, str] | None = None
) -> None:
    """BudgetService, after `require_admin`: a call scoped by x-user-id (`user`) may only
    read its own user budget (`reads` = ("user", <that user>)). Budgets are set over users,
    not by them, and a scope says nothing about teams or other users, so anything else
    scoped is PERMISSION_DENIED, whether the budget exists or not."""
    if user is not None and reads != ("user", user):
        await context.abort(
            grpc.StatusCode.PERMISSION_DENIED,
            "a call with x-user-id may only read that user's own budget (GetBudget user/<id>)",
        )


async def require_reporter(context: Context, settings: Settings) -> str | None:
    """ReportUsage: the admin or the usage token; returns the x-user-id scope, if any."""
    token = bearer(context)
    if role_of(token, settings.admin_token, settings.usage_token) is None:
        await _refuse(context, token, "admin or usage token")
    return user_scope(context)


def user_scope(context: Context) -> str | None:
    """The x-user-id scope; an empty one is refused rather than read as "everyone", and so
    are two (a front end that adds its own while passing the client's through would
    otherwise be escaped by whichever comes first)."""
    values = metadata_values(context, "x-user-id")
    if len(values) > 1:
        raise InvalidArgument("x-user-id is sent more than once")
    user = values[0] if values else None
    if user is not None and not user.strip():
        raise InvalidArgument("x-user-id is empty")
    return user


def scoped(key: VirtualKey, user: str | None) -> VirtualKey:
    """Another user's key reads as missing."""
    if user is not None and key.user_id != user:
        raise NotFound(f"key {key.id} not found")
    return key


async def owner_of_new_key(context: Context, user: str | None, requested: str) -> str:
    """CreateKey: the user_id of the new key. A scoped call may create keys only for its
    own user, and fills user_id in when it is left out."""
    owner = requested or (user or "")
    if user is not None and owner != user:
        await context.abort(
            grpc.StatusCode.PERMISSION_DENIED, "user_id must equal the x-user-id of the call"
        )
    return owner


def listable_user(user: str | None, requested: str) -> str | None:
    """ListKeys: the user_id filter to apply ("" for any), or None when the scope hides
    every key asked for (another user's)."""
    if user is None:
        return requested
    return user if requested in ("", user) else None


async def usage_key_ids(
    store: KeyStore, user: str | None, *, user_id: str, team_id: str
) -> list[str]:
    """GetUsage by user or team: the keys whose usage the caller may sum."""
    if user_id:
        if user is not None and user_id != user:
            raise NotFound("no such user among your keys")
        return await store.key_ids_of(user_id=user_id)
    key_ids = await store.key_ids_of(team_id=team_id)
    if user is not None:  # a user sees only their own part of a team
        own = set(await store.key_ids_of(user_id=user))
        key_ids = [k for k in key_ids if k in own]
    return key_ids


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
        return record
    user = await require_admin(context, settings)
    return scoped(await store.get(key_id), user)

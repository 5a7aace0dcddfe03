"""Which Redis `make run` uses, and how its banner names it.

The server reads REDIS_URL, else REDIS_HOST / REDIS_PORT / REDIS_DB (extauthz/settings.py);
`make run` follows the same order and passes those variables through untouched. Only when
none is set does it pick a Redis itself: one already answering on 6379 (said so plainly,
since its data is not ours), else a redis-server of its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import quote

from keys.connection import redacted

DEFAULT_PORT = 6379
NAMED_BY = ("REDIS_URL", "REDIS_HOST", "REDIS_PORT", "REDIS_DB")


@dataclass(frozen=True)
class RedisTarget:
    """`url` is what the server will use; `env` is what to add to its environment (empty
    when the user named the Redis: their variables reach the server as they are)."""

    url: str
    whose: str  # for the banner: who named or started this Redis
    named: bool = False
    start_own: bool = False

    @property
    def env(self) -> dict[str, str]:
        return {} if self.named else {"REDIS_URL": self.url}

    def described(self) -> str:
        return f"{shown(self.url)} ({self.whose})"


def choose(env: Mapping[str, str], local_redis_answers: bool, own_dir: str) -> RedisTarget:
    """The Redis for `make run`: the one the environment names, else the one answering on
    127.0.0.1:6379 (`local_redis_answers`), else one to start with its data in `own_dir`."""
    if env.get("REDIS_URL"):
        return RedisTarget(env["REDIS_URL"], "named by REDIS_URL", named=True)
    named = [name for name in NAMED_BY[1:] if env.get(name)]
    if named:
        host = env.get("REDIS_HOST") or "localhost"
        port = env.get("REDIS_PORT") or str(DEFAULT_PORT)
        db = env.get("REDIS_DB") or "0"
        url = f"redis://{quote(host)}:{port}/{db}"
        return RedisTarget(url, f"named by {', '.join(named)}", named=True)
    local = f"redis://127.0.0.1:{DEFAULT_PORT}/0"
    if local_redis_answers:
        return RedisTarget(local, "already running, not started by make run")
    return RedisTarget(local, f"started by make run, data in {own_dir}", start_own=True)


def shown(url: str) -> str:
    """`url` with any password masked: the banner is a log, and secrets stay out of logs."""
    return redacted(url)

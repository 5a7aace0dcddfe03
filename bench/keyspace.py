"""Many key records, fast: clones of one real key, written by a Lua script inside Redis.

The template is a key made by the server's own CreateKey and then checked once, so every
clone carries exactly the fields (and the post-Check window counters) that the server
writes, whatever the record layout is today. Each clone gets its own id, its own 64-hex
digest, its own user (ten keys per user) and the same index entries CreateKey adds
(keys.keyspace's INDEX_ALL and user indexes). Clones cannot pass a Check (their digests
match no secret); they are there to fill the keyspace and to be weighed.
"""

from __future__ import annotations

from typing import Any

import redis

from keys.keyspace import INDEX_ALL, index_key, record_key

KEYS_PER_USER = 10
BATCH = 25_000

# ARGV: template record, first index, count, record prefix, record suffix, all-index,
# user-index prefix, user-history prefix, index suffix
_CLONE = """
local tpl = redis.call('HGETALL', ARGV[1])
local hash_at, user_at, created = 0, 0, 0
for i = 1, #tpl, 2 do
  if tpl[i] == 'hash' then hash_at = i + 1 end
  if tpl[i] == 'user_id' then user_at = i + 1 end
  if tpl[i] == 'created_at' then created = tonumber(tpl[i + 1]) end
end
if hash_at == 0 or user_at == 0 then return redis.error_reply('template has no hash/user_id') end
local first, count = tonumber(ARGV[2]), tonumber(ARGV[3])
for n = first, first + count - 1 do
  local id = string.format('be%014x', n)
  tpl[hash_at] = redis.sha1hex(id) .. string.sub(redis.sha1hex(id .. '.'), 1, 24)
  local user = 'bench-user-' .. math.floor(n / %(per_user)d)
  tpl[user_at] = user
  redis.call('HSET', ARGV[4] .. id .. ARGV[5], unpack(tpl))
  redis.call('ZADD', ARGV[6], created, id)
  redis.call('ZADD', ARGV[7] .. user .. ARGV[9], created, id)
  redis.call('ZADD', ARGV[8] .. user .. ARGV[9], created, id)
end
return count
""".replace("%(per_user)d", str(KEYS_PER_USER))


def _split(template: str) -> tuple[str, str]:
    before, _, after = template.partition("\x00")
    return before, after


def clone_keys(client: redis.Redis, template_id: str, first: int, count: int) -> None:
    """Writes clones number `first` .. `first + count - 1` of the template key."""
    record_pre, record_post = _split(record_key("\x00"))
    user_pre, index_post = _split(index_key("user", "\x00"))
    hist_pre, hist_post = _split(index_key("user-hist", "\x00"))
    if hist_post != index_post:
        raise RuntimeError("index keys changed shape; update bench/keyspace.py")
    clone: Any = client.register_script(_CLONE)
    done = 0
    while done < count:
        size = min(BATCH, count - done)
        clone(
            keys=[],
            args=[
                record_key(template_id),
                first + done,
                size,
                record_pre,
                record_post,
                INDEX_ALL,
                user_pre,
                hist_pre,
                index_post,
            ],
        )
        done += size


def used_memory(client: redis.Redis) -> int:
    info: dict[str, Any] = client.info("memory")
    return int(info["used_memory"])


def record_bytes(client: redis.Redis, sample: int = 200) -> float:
    """Mean MEMORY USAGE of clone records (the hash alone, without index entries)."""
    record_pre, record_post = _split(record_key("\x00"))
    sizes = [
        int(client.memory_usage(f"{record_pre}be{n:014x}{record_post}", samples=0) or 0)
        for n in range(sample)
    ]
    return sum(sizes) / len(sizes)

-- Give a key a new secret, keeping the old one valid for a grace period.
-- KEYS[1]  the key's record hash, vk:{<id>}
-- ARGV[1]  hex SHA-256 of the new key
-- ARGV[2]  until when (ms since the epoch) the old secret still works; 0: not at all
-- returns 1 rotated, 0 no such key
-- A re-run of the same call (a client retry after a dropped connection) finds the new
-- digest already in place and changes nothing, so the old secret keeps its grace.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local old = redis.call('HGET', KEYS[1], 'hash')
if old == ARGV[1] then return 1 end
if ARGV[2] == '0' then old = '' end
redis.call('HSET', KEYS[1], 'hash', ARGV[1], 'prev_hash', old, 'prev_hash_until', ARGV[2])
return 1

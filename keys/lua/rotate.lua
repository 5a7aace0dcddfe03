-- Give a key a new secret, keeping the old one valid for a grace period.
-- (keys/lua/_lib.lua is prepended: key_event)
-- KEYS[1]  the key's record hash, vk:{<id>}
-- KEYS[2]  the ledger stream of its slot (absent: no ledger, nothing is appended)
-- ARGV[1]  hex SHA-256 of the new key
-- ARGV[2]  until when (ms since the epoch) the old secret still works; 0: not at all
-- ARGV[3]  now, ms since the epoch
-- returns 1 rotated, 0 no such key
-- A re-run of the same call (a client retry after a dropped connection) finds the new
-- digest already in place and changes nothing, so the old secret keeps its grace and
-- the ledger gets one `rotated`.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local old = redis.call('HGET', KEYS[1], 'hash')
if old == ARGV[1] then return 1 end
if ARGV[2] == '0' then old = '' end
redis.call('HSET', KEYS[1], 'hash', ARGV[1], 'prev_hash', old, 'prev_hash_until', ARGV[2])
key_event(KEYS[2], KEYS[1], 'rotated', ARGV[3])
return 1

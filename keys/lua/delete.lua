-- Delete a key's record, open reservations and per-model windows in one step, and tell
-- the ledger what the record was. (keys/lua/_lib.lua is prepended: key_event)
-- The request markers and daily rollups stay (until their TTL): usage totals still count
-- a deleted key, and a late report of it is NOT_FOUND, not charged.
-- KEYS[1]  the key's record hash, vk:{<id>}
-- KEYS[2]  its open reservations, vk:{<id>}:inflight
-- KEYS[3]  its per-model windows, vk:{<id>}:mwin
-- KEYS[4]  the ledger stream of its slot (absent: no ledger, nothing is appended)
-- ARGV[1]  now, ms since the epoch
-- returns 1 deleted, 0 no such key (already deleted: a re-run appends nothing)
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
key_event(KEYS[4], KEYS[1], 'deleted', ARGV[1])
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
return 1

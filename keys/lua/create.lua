-- Store a new key record unless its id is taken. (keys/lua/_lib.lua is prepended: key_event)
-- KEYS[1]  the key's record hash, vk:{<id>}
-- KEYS[2]  the ledger stream of its slot (absent: no ledger, nothing is appended)
-- ARGV[1]  now, ms since the epoch
-- ARGV[2..] field, value, field, value, ... with ("hash", <digest>) first
-- returns 1 created, 0 the id belongs to another key (the caller draws another id)
-- A re-run of the same call (a client retry after a dropped connection) finds its own
-- digest and answers 1 again, so it never creates a second key nor appends twice.
if redis.call('EXISTS', KEYS[1]) == 1 then
  if redis.call('HGET', KEYS[1], 'hash') == ARGV[3] then return 1 end
  return 0
end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
key_event(KEYS[2], KEYS[1], 'created', ARGV[1])
return 1

-- Store a new key record unless its id is taken.
-- KEYS[1]  the key's record hash, vk:{<id>}
-- ARGV     field, value, field, value, ... with ("hash", <digest>) first
-- returns 1 created, 0 the id belongs to another key (the caller draws another id)
-- A re-run of the same call (a client retry after a dropped connection) finds its own
-- digest and answers 1 again, so it never creates a second key.
if redis.call('EXISTS', KEYS[1]) == 1 then
  if redis.call('HGET', KEYS[1], 'hash') == ARGV[2] then return 1 end
  return 0
end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1

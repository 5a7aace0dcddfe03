-- Store a new key record unless its id is taken.
-- KEYS[1]  the key's record hash, vk:{<id>}
-- ARGV     field, value, field, value, ...
-- returns 1 created, 0 the id exists (the caller draws another)
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1

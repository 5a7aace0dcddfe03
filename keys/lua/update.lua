-- Set fields on an existing key record; never creates one.
-- KEYS[1]  the key's record hash, vk:{<id>}
-- ARGV     field, value, field, value, ...
-- returns 1 updated, 0 no such key
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1

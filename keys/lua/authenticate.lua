-- Is this the key's secret, and may the key be used at all? Counts nothing.
-- Check asks this first for requests with large bodies, so a made-up key never costs
-- the body parse (keys/lua/_lib.lua is prepended: key_state).
-- KEYS[1]  the key's record hash, vk:{<id>}
-- ARGV[1]  hex SHA-256 of the presented key
-- ARGV[2]  now, ms since the epoch
-- returns {code}: 0 usable, 1 unknown key or wrong secret, 2 revoked, 3 expired
--   (the same codes as check.lua)
local digest = ARGV[1]
local now = tonumber(ARGV[2])
return {key_state(KEYS[1], digest, now)}

-- Is this the key's secret, and may the key be used at all? Counts nothing.
-- Check asks this first for requests with large bodies, so a made-up key never costs
-- the body parse (keys/lua/_budget.lua is prepended: same_digest, NO_DIGEST).
-- KEYS[1]  the key's record hash, vk:{<id>}
-- ARGV[1]  hex SHA-256 of the presented key
-- ARGV[2]  now, ms since the epoch
-- returns {code}: 0 usable, 1 unknown key or wrong secret, 2 revoked, 3 expired
--   (the same codes as check.lua)
local digest = ARGV[1]
local now = tonumber(ARGV[2])
local f = redis.call('HMGET', KEYS[1], 'hash', 'prev_hash', 'prev_hash_until', 'status',
  'expires_at')
if not same_digest(digest, f[1] or NO_DIGEST) then  -- as in check.lua
  local previous = same_digest(digest, (f[2] ~= false and f[2] ~= '') and f[2] or NO_DIGEST)
  if f[1] == false or not (previous and now < (tonumber(f[3]) or 0)) then return {1} end
end
if f[4] ~= 'active' then return {2} end
local expires_at = tonumber(f[5])
if expires_at > 0 and now >= expires_at then return {3} end
return {0}

-- Prepended to check.lua, authenticate.lua and report_usage.lua when they are loaded.
-- roll_budget starts a new budget period once its reset time has passed: spent goes back
-- to 0 and the reset moves to the next boundary (fixed periods step by their length;
-- calendar months jump to next_month, the first instant of the next UTC month, which
-- the caller computes). Returns true when it rolled.
local function roll_budget(key, now, reset_at, period, next_month)
  reset_at = tonumber(reset_at) or 0
  if reset_at == 0 or now < reset_at then return false end
  period = tonumber(period) or 0
  local next_reset = next_month
  if period > 0 then
    next_reset = reset_at + (math.floor((now - reset_at) / period) + 1) * period
  end
  redis.call('HSET', key, 'spent', 0, 'budget_reset_at', string.format('%d', next_reset))
  return true
end

-- What a missing digest is compared against: 64 hex characters, like a real one, that
-- no SHA-256 of a key equals (the key's text is never empty).
local NO_DIGEST = string.rep('0', 64)

-- Constant time: every byte is compared whatever the first difference.
local function same_digest(a, b)
  if not a or not b or #a ~= #b or #a == 0 then return false end
  local diff = 0
  for i = 1, #a do
    diff = bit.bor(diff, bit.bxor(string.byte(a, i), string.byte(b, i)))
  end
  return diff == 0
end


-- The key's own steps of a Check, shared by check.lua and authenticate.lua:
-- 0 usable, 1 unknown key or wrong secret, 2 revoked, 3 expired.
-- It reads only these five fields, so a known id with a wrong secret costs about what an
-- unknown id costs (the rest of the record is read by the caller, for a usable key). A
-- presented key that is not the current secret is compared once more, with the
-- rotated-out secret (which works until its grace ends), or with a stand-in where the
-- record or that secret is missing: the reply's timing does not tell which ids exist.
local function key_state(key, digest, now)
  local f = redis.call('HMGET', key, 'hash', 'prev_hash', 'prev_hash_until', 'status',
    'expires_at')
  if not same_digest(digest, f[1] or NO_DIGEST) then
    local previous = same_digest(digest, (f[2] ~= false and f[2] ~= '') and f[2] or NO_DIGEST)
    if f[1] == false or not (previous and now < (tonumber(f[3]) or 0)) then return 1 end
  end
  if f[4] ~= 'active' then return 2 end
  local expires_at = tonumber(f[5])
  if expires_at > 0 and now >= expires_at then return 3 end
  return 0
end

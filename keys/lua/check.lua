-- Check one request against a key and, when it passes, count it. The whole hot path.
-- (keys/lua/_lib.lua is prepended: key_state, roll_budget)
-- KEYS[1]  the key's record hash, vk:{<id>}
-- ARGV[1]  hex SHA-256 of the presented key
-- ARGV[2]  now, ms since the epoch (the caller's clock)
-- ARGV[3]  body model: 0 no body, 1 named (ARGV[4]), 2 unreadable
-- ARGV[4]  model name
-- ARGV[5]  rate window length, ms
-- ARGV[6]  the first instant of next month (UTC), ms, for monthly budgets
-- returns {code, user_id, team_id, rpm_limit, requests, tpm_limit, tokens, reset_ms}
--   (only {code} for codes 1-5) where code is 0 allowed and counted, 1 unknown key or
--   wrong secret, 2 revoked, 3 expired, 4 model not allowed, 5 budget spent,
--   6 over RPM, 7 over TPM
local digest = ARGV[1]
local now = tonumber(ARGV[2])
local model_kind = ARGV[3]
local model = ARGV[4]
local window = tonumber(ARGV[5])

local state = key_state(KEYS[1], digest, now)
if state ~= 0 then return {state} end
-- the rest of the record only for a usable key (f[1..5] are key_state's fields)
local f = redis.call('HMGET', KEYS[1], 'hash', 'prev_hash', 'prev_hash_until', 'status',
  'expires_at', 'models', 'max_budget', 'spent', 'budget_reset_at', 'budget_period_ms',
  'rpm_limit', 'tpm_limit', 'win_start', 'win_requests', 'win_tokens', 'user_id', 'team_id')
if f[6] ~= '*' and model_kind ~= '0' then
  if model_kind ~= '1' or not string.find(f[6], '\n' .. model .. '\n', 1, true) then
    return {4}
  end
end
-- money as non-negative integer strings, compared exactly (no float rounding)
local budget, spent = f[7], f[8]
if roll_budget(KEYS[1], now, f[9], f[10], tonumber(ARGV[6])) then spent = '0' end
if budget ~= '0' and (#spent > #budget or (#spent == #budget and spent >= budget)) then
  return {5}
end

local rpm, tpm = tonumber(f[11]), tonumber(f[12])
local start = tonumber(f[13])
local requests, tokens = tonumber(f[14]), tonumber(f[15])
local fresh = now >= start + window
if fresh then
  start, requests, tokens = now, 0, 0
end
local reply = {0, f[16], f[17], rpm, requests, tpm, tokens, start + window - now}
if rpm > 0 and requests >= rpm then
  reply[1] = 6
  return reply
end
if tpm > 0 and tokens >= tpm then
  reply[1] = 7
  return reply
end
reply[5] = requests + 1
if fresh then
  redis.call('HSET', KEYS[1], 'win_start', ARGV[2], 'win_requests', 1, 'win_tokens', 0,
    'last_used', ARGV[2])
else
  redis.call('HINCRBY', KEYS[1], 'win_requests', 1)
  redis.call('HSET', KEYS[1], 'last_used', ARGV[2])
end
redis.call('HINCRBY', KEYS[1], 'total_requests', 1)
return reply

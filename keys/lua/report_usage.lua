-- Charge one completed request to a key, once per request id.
-- (keys/lua/_lib.lua is prepended: roll_budget)
-- KEYS[1]  the key's record hash, vk:{<id>}
-- KEYS[2]  the request's idempotency marker, vk:{<id>}:req:<request_id>
-- KEYS[3]  the key's rollup for today, vk:{<id>}:usage:<yyyymmdd>
-- ARGV[1]  now, ms since the epoch
-- ARGV[2]  cost, integer nano-USD
-- ARGV[3]  total tokens (counted against TPM)
-- ARGV[4]  prompt tokens
-- ARGV[5]  completion tokens
-- ARGV[6]  model
-- ARGV[7]  seconds to remember the request id
-- ARGV[8]  rate window length, ms
-- ARGV[9]  seconds to keep the daily rollup
-- ARGV[10] the first instant of next month (UTC), ms, for monthly budgets
-- returns {status, spent, max_budget}: status 0 unknown key, 1 charged, 2 duplicate,
--   3 refused: the charge would overflow an int64 counter (money as integer strings)
if redis.call('EXISTS', KEYS[1]) == 0 then return {0, '0', '0'} end
local f = redis.call('HMGET', KEYS[1], 'spent', 'max_budget', 'win_tokens')
if redis.call('EXISTS', KEYS[2]) == 1 then return {2, f[1], f[2]} end
-- refused before the request id is used, so a corrected retry can still charge it
-- (9.2e18 stays below 2^63 by far more than a double's rounding at that size)
if tonumber(f[1]) + tonumber(ARGV[2]) > 9.2e18 or tonumber(f[3]) + tonumber(ARGV[3]) > 9.2e18 then
  return {3, f[1], f[2]}
end
redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[7])
local now = tonumber(ARGV[1])
local b = redis.call('HMGET', KEYS[1], 'budget_reset_at', 'budget_period_ms')
roll_budget(KEYS[1], now, b[1], b[2], tonumber(ARGV[10]))
redis.call('HINCRBY', KEYS[1], 'spent', ARGV[2])

local start = tonumber(redis.call('HGET', KEYS[1], 'win_start'))
if now >= start + tonumber(ARGV[8]) then
  redis.call('HSET', KEYS[1], 'win_start', ARGV[1], 'win_requests', 0, 'win_tokens', ARGV[3])
else
  redis.call('HINCRBY', KEYS[1], 'win_tokens', ARGV[3])
end

local model = ARGV[6]
redis.call('HINCRBY', KEYS[3], 'requests:' .. model, 1)
redis.call('HINCRBY', KEYS[3], 'prompt_tokens:' .. model, ARGV[4])
redis.call('HINCRBY', KEYS[3], 'completion_tokens:' .. model, ARGV[5])
redis.call('HINCRBY', KEYS[3], 'cost:' .. model, ARGV[2])
redis.call('EXPIRE', KEYS[3], ARGV[9])

local f = redis.call('HMGET', KEYS[1], 'spent', 'max_budget')
return {1, f[1], f[2]}

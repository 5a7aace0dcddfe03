-- Charge one completed request to its key, and to the budgets above it, once per
-- request id; close the request's reservation (its in-flight record) at every level.
-- (keys/lua/_lib.lua is prepended: release, charge)
-- KEYS[1]  the key's record hash, vk:{<id>}
-- KEYS[2]  the request's idempotency marker, vk:{<id>}:req:<request_id>
-- KEYS[3]  the key's rollup for today, vk:{<id>}:usage:<yyyymmdd>
-- KEYS[4]  the key's open reservations, vk:{<id>}:inflight
-- KEYS[5]  the key's per-model windows, vk:{<id>}:mwin
-- KEYS[6..] levels inline (single Redis): user record and in-flight set, then the team's
-- KEYS[..]  after the levels: the ledger stream of the key's slot, when ARGV[17] is 1; then
--          the alert stream of the key's slot, when ARGV[18] is not empty (last)
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
-- ARGV[11] the request id
-- ARGV[12] inline or apart (as check.lua's ARGV[11])
-- ARGV[13] the user id whose budget KEYS[6..7] are; ARGV[14] the team id after it
-- ARGV[15] the price-table entry that prices the model ('' none), for per-model limits
-- ARGV[16] the provider, as reported (for the ledger)
-- ARGV[17] 1: append the charge to the ledger stream (KEYS, after the levels); 0: no ledger
-- ARGV[18] budget alert thresholds, basis points of max_budget ascending ("5000,8000,10000"),
--          or '' (no alerts: nothing is read or written for them)
-- returns {status, spent, max_budget, settled, user_id, team_id, reserved, alerts}: status 0
--   unknown key, 1 charged, 2 duplicate, 3 refused: the charge would overflow an int64
--   counter, 10 inline levels needed and not given (or not these); settled 1 the request's
--   reservation was open and is now closed, 0 none was open, -1 it had expired; alerts: the
--   budget alert events appended (key and inline levels)
if redis.call('EXISTS', KEYS[1]) == 0 then return {0, '0', '0', 0, '', ''} end
local f = redis.call('HMGET', KEYS[1], 'spent', 'max_budget', 'win_tokens', 'user_id', 'team_id')
local user_id, team_id = f[4] or '', f[5] or ''
if ARGV[12] == 'inline' and (ARGV[13] ~= user_id or ARGV[14] ~= team_id) then
  return {10, f[1], f[2], 0, user_id, team_id}
end
if redis.call('EXISTS', KEYS[2]) == 1 then return {2, f[1], f[2], 0, user_id, team_id} end
-- refused before the request id is used, so a corrected retry can still charge it
-- (9.2e18 stays below 2^63 by far more than a double's rounding at that size); the
-- lifetime spent_total too: a budget period resets spent, never it
local total = tonumber(redis.call('HGET', KEYS[1], 'spent_total')) or 0
if tonumber(f[1]) + tonumber(ARGV[2]) > 9.2e18 or tonumber(f[3]) + tonumber(ARGV[3]) > 9.2e18
    or total + tonumber(ARGV[2]) > 9.2e18 then
  return {3, f[1], f[2], 0, user_id, team_id}
end
redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[7])
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[8])
local next_month = tonumber(ARGV[10])
local id, cost, tokens = ARGV[11], ARGV[2], ARGV[3]
local key_id = string.match(KEYS[1], '^vk:{(.*)}$')

-- the streams after the levels: the ledger's, then the alerts' (the last)
local thresholds = ARGV[18] or ''
local alert_stream = thresholds ~= '' and KEYS[#KEYS] or nil
local ledger_stream = KEYS[#KEYS - (alert_stream and 1 or 0)]

local settled = release({rec = KEYS[1], inf = KEYS[4]}, id, now)
local read, rolled = charge(KEYS[1], now, cost, tokens, window, next_month, alert_stream)
local alerts = 0
if alert_stream then
  alerts = budget_alerts(KEYS[1], 'key', key_id, alert_stream, thresholds, ARGV[1], cost, read,
    rolled)
end
-- lifetime spend, never reset by a budget period: what the ledger must sum to
redis.call('HINCRBY', KEYS[1], 'spent_total', cost)

local model = ARGV[6]
-- the per-model limit that counts this model: its exact name, else its price entry
local found = redis.call('HMGET', KEYS[1], 'ml:' .. model, 'ml:' .. ARGV[15])
if found[1] or found[2] then
  local lm = found[1] and model or ARGV[15]
  local start = tonumber(redis.call('HGET', KEYS[5], 's:' .. lm)) or 0
  if now >= start + window then
    redis.call('HSET', KEYS[5], 's:' .. lm, now, 'r:' .. lm, 0, 't:' .. lm, tokens)
  else
    redis.call('HINCRBY', KEYS[5], 't:' .. lm, tokens)
  end
  redis.call('PEXPIRE', KEYS[5], window * 2)
end

if ARGV[12] == 'inline' then
  local k = 6
  for _, scope in ipairs({{'user', user_id}, {'team', team_id}}) do
    if scope[2] ~= '' then
      if redis.call('EXISTS', KEYS[k]) == 1 then
        release({rec = KEYS[k], inf = KEYS[k + 1], prefix = key_id .. ':'}, id, now)
        read, rolled = charge(KEYS[k], now, cost, tokens, window, next_month, alert_stream)
        if alert_stream then
          alerts = alerts + budget_alerts(KEYS[k], scope[1], scope[2], alert_stream,
            thresholds, ARGV[1], cost, read, rolled)
        end
      end
      k = k + 2
    end
  end
end

redis.call('HINCRBY', KEYS[3], 'requests:' .. model, 1)
redis.call('HINCRBY', KEYS[3], 'prompt_tokens:' .. model, ARGV[4])
redis.call('HINCRBY', KEYS[3], 'completion_tokens:' .. model, ARGV[5])
redis.call('HINCRBY', KEYS[3], 'cost:' .. model, cost)
redis.call('EXPIRE', KEYS[3], ARGV[9])

-- the ledger records the key's charge only (on Cluster, level_settle.lua appends nothing)
if ARGV[17] == '1' then
  redis.call('XADD', ledger_stream, '*', 'type', 'charge', 'key_id', key_id, 'ts', ARGV[1],
    'request_id', id, 'model', model, 'provider', ARGV[16], 'prompt_tokens', ARGV[4],
    'completion_tokens', ARGV[5], 'total_tokens', tokens, 'cost', cost)
end

f = redis.call('HMGET', KEYS[1], 'spent', 'max_budget', 'reserved')
return {1, f[1], f[2], settled, user_id, team_id, f[3] or '0', alerts}

-- Create a user's or team's budget, or change its configuration (keys/budgets.py).
-- KEYS[1]  the budget record hash, vb:{<scope>:<id>}
-- ARGV     now_ms, max_budget, budget_duration, budget_period_ms, budget_reset_at,
--          rpm_limit, tpm_limit, max_parallel
-- returns  {1 created | 0 changed, created_at ms}
-- The counters (spent, reserved, the RPM/TPM window) belong to the check and report
-- scripts: they start at 0 on a new record and are never touched here afterwards. A new
-- budget_duration starts its first period now (ARGV[5], computed by the caller); the same
-- one keeps the current period. HSETNX also fills in a counter that a record without one
-- lacks, so every reader finds every field. A change of max_budget or budget_duration sets
-- `budget_set_at`: without a period, budget alerts count theirs from it (design section 13).
local key = KEYS[1]
local created = redis.call('EXISTS', key) == 0 and 1 or 0
local before = redis.call('HMGET', key, 'max_budget', 'budget_duration')
if created == 0 and (before[1] ~= ARGV[2] or before[2] ~= ARGV[3]) then
  redis.call('HSET', key, 'budget_set_at', ARGV[1])
end
redis.call('HSET', key,
  'max_budget', ARGV[2], 'rpm_limit', ARGV[6], 'tpm_limit', ARGV[7], 'max_parallel', ARGV[8])
if created == 1 or redis.call('HGET', key, 'budget_duration') ~= ARGV[3] then
  redis.call('HSET', key,
    'budget_duration', ARGV[3], 'budget_period_ms', ARGV[4], 'budget_reset_at', ARGV[5])
end
for _, field in ipairs({'spent', 'reserved', 'win_start', 'win_requests', 'win_tokens'}) do
  redis.call('HSETNX', key, field, 0)
end
redis.call('HSETNX', key, 'created_at', ARGV[1])
return {created, tonumber(redis.call('HGET', key, 'created_at'))}

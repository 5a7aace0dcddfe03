-- Redis Cluster: report_usage.lua's charge at one budget above the key, in its own slot,
-- once per (key, request id) at this level (its own marker), so a retried report
-- completes a level that a crash left uncharged and charges no level twice.
-- (keys/lua/_lib.lua is prepended: release, charge, budget_alerts)
-- KEYS[1]  the budget's record   KEYS[2] its open reservations   KEYS[3] this level's marker
-- KEYS[4]  the alert stream of the budget's slot, when ARGV[8] is not empty
-- ARGV[1]  now, ms   ARGV[2] the member, `<key id>:<request id>`   ARGV[3] cost, nano-USD
-- ARGV[4]  tokens
-- ARGV[5]  rate window, ms   ARGV[6] next month start, ms   ARGV[7] seconds to keep the marker
-- ARGV[8]  budget alert thresholds, basis points ascending, or '' (none; may be absent)
-- ARGV[9]  the scope (user or team) and ARGV[10] the id, as the alert events name them
-- returns {code, alerts}: code 0 no such budget, 1 charged, 2 charged before; alerts: the
--   budget alert events appended
if redis.call('EXISTS', KEYS[1]) == 0 then return {0, 0} end
if redis.call('EXISTS', KEYS[3]) == 1 then return {2, 0} end
redis.call('SET', KEYS[3], 1, 'EX', ARGV[7])
local now = tonumber(ARGV[1])
release({rec = KEYS[1], inf = KEYS[2]}, ARGV[2], now)
local alerting = (ARGV[8] or '') ~= ''
local read, rolled = charge(KEYS[1], now, ARGV[3], ARGV[4], tonumber(ARGV[5]),
  tonumber(ARGV[6]), alerting)
local alerts = 0
if alerting then
  alerts = budget_alerts(KEYS[1], ARGV[9], ARGV[10], KEYS[4], ARGV[8], ARGV[1], ARGV[3], read,
    rolled)
end
return {1, alerts}

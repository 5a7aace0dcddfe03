-- Redis Cluster: check.lua's steps for one budget above the key (a user's or a team's,
-- in its own slot), run after the key's own script allowed the request. Atomic at this
-- level; keys/store.py releases the levels already admitted when a later one refuses.
-- A budget above the key binds every key under it: shadow mode does not waive it.
-- Idempotent for one request (member): keys/store.py retries it once after a failure.
-- (keys/lua/_lib.lua is prepended)
-- KEYS[1]  the budget's record, vb:{<scope>:<id>}
-- KEYS[2]  its open reservations
-- ARGV[1]  now, ms          ARGV[2] rate window, ms     ARGV[3] next month start, ms
-- ARGV[4]  the member, `<key id>:<request id>`   ARGV[5] the reservation, nano-USD
-- ARGV[6]  reservation lifetime, ms   ARGV[7] 1 priced, 0 not   ARGV[8] reserve or after
-- ARGV[9]  1 open an in-flight record, 0 not (as check.lua's ARGV[15])
-- returns {code, d1, d2, d3, admitted}: codes as check.lua's (0 passed, 5 budget, 6 RPM,
--   7 TPM, 8 not priced, 9 concurrency); admitted 1 when the request was counted here
--   (0 for a budget that does not exist, or a denial)
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local lv = load_level('level', KEYS[1], KEYS[2], now, tonumber(ARGV[3]))
if not lv then return {0, '', 0, 0, 0} end  -- no budget here
-- already admitted (a retry after a lost answer): the same answer, nothing counted twice
if redis.call('ZSCORE', KEYS[2], ARGV[4]) then return {0, '', 0, 0, 1} end
local amount = ARGV[5]
local opens = ARGV[9] ~= '0'

local short = nil
if ARGV[7] == '0' and lv.budget ~= '0' then short = {8, '', 0, 0} end
local free = budget_short(lv, amount, ARGV[8])
if free and not short then short = {5, free, 0, 0} end
local hit = rate_short(lv, now, window)
if hit and not short then short = {hit[1] == 'rpm' and 6 or 7, hit[2], hit[3], hit[4]} end
local full = opens and parallel_short(lv, now)
if full and not short then short = {9, full, 0, 0} end
if short then return {short[1], short[2], short[3], short[4], 0} end

admit(lv, now, window, ARGV[4], amount, now + tonumber(ARGV[6]), tonumber(ARGV[6]) + 60000, opens)
return {0, '', 0, 0, 1}

-- Check one request against a key and every budget above it and, when it passes, count
-- it, reserve its cost and open its in-flight record: the whole hot path, one script.
-- (keys/lua/_lib.lua is prepended: key_state, load_level, the steps, admit)
-- KEYS[1]  the key's record hash, vk:{<id>}
-- KEYS[2]  the key's open reservations, vk:{<id>}:inflight
-- KEYS[3]  the key's per-model windows, vk:{<id>}:mwin
-- KEYS[4..] levels inline (single Redis): user record, user in-flight set, then the
--          team's, for the ids in ARGV[12], ARGV[13] (absent on Cluster: see ARGV[11])
-- ARGV[1]  hex SHA-256 of the presented key
-- ARGV[2]  now, ms since the epoch (the caller's clock)
-- ARGV[3]  body model: 0 no body, 1 named (ARGV[4]), 2 unreadable
-- ARGV[4]  model name
-- ARGV[5]  rate window length, ms
-- ARGV[6]  the first instant of next month (UTC), ms, for monthly budgets
-- ARGV[7]  the request id, `<random>-<amount>` (keys/keyspace.py reservation_id)
-- ARGV[8]  the reservation, nano-USD (0 in after mode or for a request that costs nothing)
-- ARGV[9]  1 the model has a price (or the request has none to pay), 0 it has none
-- ARGV[10] reservation lifetime, ms
-- ARGV[11] inline: the user and team budgets are KEYS[4..]; apart: the caller checks them
--          in their own scripts (Cluster: other slots) and only the key is checked here
-- ARGV[12] the user id whose budget KEYS[4..5] are ('' none)
-- ARGV[13] the team id whose budget follows the user's ('' none)
-- ARGV[14] budget mode: reserve or after
-- ARGV[15] 1 open an in-flight record (and take a concurrency slot), 0 not: a request
--          without a body, which nothing will report (GET /v1/models)
-- ARGV[16] the price-table entry that prices the model ('' none), for per-model limits
-- returns {code} for codes 1-3; {10, user_id, team_id} when inline levels are needed and
-- not given (or not these); else {code, user_id, team_id, rpm_limit, requests, tpm_limit,
-- tokens, reset_ms, request_id, expired, shadow_code, level, d1, d2, d3, enforce, levels}:
--   code 0 allowed and counted, 1 unknown key or wrong secret, 2 revoked, 3 expired,
--   4 model not allowed, 5 budget, 6 over RPM, 7 over TPM, 8 model not priced,
--   9 concurrency; shadow_code: what a key with enforce off would have got (0 none);
--   level: key, model, user or team (of the denial); d1..d3: budget: the nano-USD free;
--   rate: limit, used, ms until reset; concurrency: the limit; enforce: 1, or 0 in
--   shadow mode (the levels on Cluster are told); levels: the levels checked, comma-joined.
local now = tonumber(ARGV[2])
local model_kind, model = ARGV[3], ARGV[4]
local window = tonumber(ARGV[5])
local next_month = tonumber(ARGV[6])
local amount, priced = ARGV[8], ARGV[9]
local ttl = tonumber(ARGV[10])
local mode = ARGV[14]
local opens = ARGV[15] ~= '0'

local state = key_state(KEYS[1], ARGV[1], now)
if state ~= 0 then return {state} end
-- the rest of the record in one read: the level fields, then the key's own, then the
-- per-model limits that could apply (the exact name, and the price-table entry)
local n = #LEVEL_FIELDS
local kf = {unpack(LEVEL_FIELDS)}
for _, name in ipairs({'models', 'user_id', 'team_id', 'enforce', 'ml:' .. model,
  'ml:' .. ARGV[16]}) do kf[#kf + 1] = name end
local kv = redis.call('HMGET', KEYS[1], unpack(kf))
local f = {kv[n + 1], kv[n + 2], kv[n + 3], kv[n + 4]}
local user_id, team_id = f[2] or '', f[3] or ''
if ARGV[11] == 'inline' and (ARGV[12] ~= user_id or ARGV[13] ~= team_id) then
  return {10, user_id, team_id}
end

local levels = {load_level('key', KEYS[1], KEYS[2], now, next_month, kv)}
local key_id = string.match(KEYS[1], '^vk:{(.*)}$')
if ARGV[11] == 'inline' then
  local k = 4
  for _, scope in ipairs({{'user', user_id}, {'team', team_id}}) do
    if scope[2] ~= '' then
      local lv = load_level(scope[1], KEYS[k], KEYS[k + 1], now, next_month)
      if lv then  -- a budget set for this user or team
        lv.prefix = key_id .. ':'  -- its members name the key: no other key's report closes them
        levels[#levels + 1] = lv
      end
      k = k + 2
    end
  end
end

-- the first failing step decides: {code, level, d1, d2, d3}. Shadow mode (the key's
-- `enforce` off) waives the key's own limits only: a user's or team's budget binds
-- every key under it, so the first failure there (`hard`) denies whatever the key says.
local short, hard = nil, nil
local function fail(code, level, d1, d2, d3)
  local s = {code, level, d1 or '', d2 or 0, d3 or 0}
  if not short then short = s end
  if not hard and (level == 'user' or level == 'team') then hard = s end
end

if f[1] ~= '*' and model_kind ~= '0' then
  if model_kind ~= '1' or not string.find(f[1], '\n' .. model .. '\n', 1, true) then
    fail(4, 'key')
  end
end
if priced == '0' then
  for _, lv in ipairs(levels) do
    if lv.budget ~= '0' then fail(8, lv.name) break end
  end
end
for _, lv in ipairs(levels) do
  local free = budget_short(lv, amount, mode)
  if free then fail(5, lv.name, free) end
end
-- rate: the key, the key's limit for this model, then the levels above
-- a per-model limit names a model exactly, or the price-table entry that prices it
-- (ARGV[16]: `gpt-4o` limits `gpt-4o-2024-08-06` too); the exact name wins
local per_model, lm = nil, nil
if model_kind == '1' then
  local ml = kv[n + 5] or kv[n + 6]
  if ml then
    lm = kv[n + 5] and model or ARGV[16]
    local rpm, tpm = string.match(ml, '^(%d+) (%d+)$')
    local w = redis.call('HMGET', KEYS[3], 's:' .. lm, 'r:' .. lm, 't:' .. lm)
    per_model = {name = 'model', rpm = tonumber(rpm), tpm = tonumber(tpm),
      start = tonumber(w[1]) or 0, requests = tonumber(w[2]) or 0, tokens = tonumber(w[3]) or 0}
  end
end
local key_rate = rate_short(levels[1], now, window)
if key_rate then fail(key_rate[1] == 'rpm' and 6 or 7, 'key', key_rate[2], key_rate[3], key_rate[4]) end
if per_model then
  local hit = rate_short(per_model, now, window)
  if hit then fail(hit[1] == 'rpm' and 6 or 7, 'model', hit[2], hit[3], hit[4]) end
end
for i = 2, #levels do
  local hit = rate_short(levels[i], now, window)
  if hit then fail(hit[1] == 'rpm' and 6 or 7, levels[i].name, hit[2], hit[3], hit[4]) end
end
if opens then
  for _, lv in ipairs(levels) do
    local full = parallel_short(lv, now)
    if full then fail(9, lv.name, full) end
  end
end

local key = levels[1]
local shadow = f[4] == '0'
local names = levels[1].name
for i = 2, #levels do names = names .. ',' .. levels[i].name end
local function reply(code, id, s)
  local r = {code, user_id, team_id, key.rpm, key.requests, key.tpm, key.tokens,
    key.start + window - now, id or '', key.expired, 0, '', '', 0, 0, shadow and 0 or 1,
    names}
  if s then r[11], r[12], r[13], r[14], r[15] = s[1], s[2], s[3], s[4], s[5] end
  return r
end
local decisive = short
if shadow then decisive = hard end
if decisive then return reply(decisive[1], nil, decisive) end

local id = ARGV[7]
local expires, keep = now + ttl, ttl + 60000
for _, lv in ipairs(levels) do admit(lv, now, window, id, amount, expires, keep, opens) end
if per_model then
  if per_model.fresh then
    redis.call('HSET', KEYS[3], 's:' .. lm, now, 'r:' .. lm, 1, 't:' .. lm, 0)
  else
    redis.call('HINCRBY', KEYS[3], 'r:' .. lm, 1)
  end
  redis.call('PEXPIRE', KEYS[3], window * 2)
end
redis.call('HSET', KEYS[1], 'last_used', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'total_requests', 1)
return reply(0, id, short)

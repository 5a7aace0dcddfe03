-- Prepended to every script but set_budget.lua when it is loaded (keys/scripts.py).
-- roll_budget starts a new budget period once its reset time has passed: spent goes back
-- to 0 and the reset moves to the next boundary (fixed periods step by their length;
-- calendar months jump to next_month, the first instant of the next UTC month, which
-- the caller computes). Returns the new reset time when it rolled, else false.
local function roll_budget(key, now, reset_at, period, next_month)
  reset_at = tonumber(reset_at) or 0
  if reset_at == 0 or now < reset_at then return false end
  period = tonumber(period) or 0
  local next_reset = next_month
  if period > 0 then
    next_reset = reset_at + (math.floor((now - reset_at) / period) + 1) * period
  end
  redis.call('HSET', key, 'spent', 0, 'budget_reset_at', string.format('%d', next_reset))
  return next_reset
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


-- Money: nano-USD as decimal strings (HINCRBY keeps them exact in Redis). Lua numbers
-- are doubles, exact only below 2^53 (~$9M), so sums and comparisons split each amount
-- into {whole units of 1e9 nano-USD, the rest}: exact up to int64.
local function m_parse(s)
  s = s or '0'
  if string.sub(s, 1, 1) == '-' then return {0, 0} end -- never negative; a bug reads as 0
  local n = #s
  if n <= 9 then return {0, tonumber(s) or 0} end
  return {tonumber(string.sub(s, 1, n - 9)), tonumber(string.sub(s, n - 8))}
end

local function m_add(a, b)
  local hi, lo = a[1] + b[1], a[2] + b[2]
  if lo >= 1e9 then hi, lo = hi + 1, lo - 1e9 end
  return {hi, lo}
end

local function m_le(a, b)
  return a[1] < b[1] or (a[1] == b[1] and a[2] <= b[2])
end

-- max(a - b, 0) as a decimal string
local function m_sub_floor(a, b)
  if m_le(a, b) then return '0' end
  local hi, lo = a[1] - b[1], a[2] - b[2]
  if lo < 0 then hi, lo = hi - 1, lo + 1e9 end
  if hi == 0 then return string.format('%d', lo) end
  return string.format('%d%09d', hi, lo)
end

-- The nano-USD a reservation id (`<token>-<amount>`, keys/keyspace.py) holds.
local function reserved_by(id)
  return string.match(id, '%-(%d+)$') or '0'
end

-- A level is the key itself, or a user's or team's budget: the same money and window
-- fields in a hash (rec) and its open reservations in a sorted set (inf: member = the
-- request id, score = when it expires).
local LEVEL_FIELDS = {'max_budget', 'spent', 'reserved', 'budget_reset_at',
  'budget_period_ms', 'rpm_limit', 'tpm_limit', 'win_start', 'win_requests', 'win_tokens',
  'max_parallel'}
local REAP_MAX = 64

-- Releases up to REAP_MAX reservations that expired unreported (their amounts come off
-- `reserved`). A backlog beyond that stays counted in `reserved` until the next call:
-- the error is on the side of refusing, never of giving money away. Returns how many.
local function reap(lv, now)
  -- the earliest expiry says, in one command, whether anything has expired (usually not)
  local first = redis.call('ZRANGE', lv.inf, 0, 0, 'WITHSCORES')
  if #first == 0 then
    if lv.reserved ~= '0' then
      -- the set expired whole (every member had): nothing is held any more
      redis.call('HSET', lv.rec, 'reserved', 0)
      lv.reserved = '0'
    end
    return 0
  end
  if tonumber(first[2]) > now then return 0 end
  local gone = redis.call('ZRANGEBYSCORE', lv.inf, '-inf', now, 'LIMIT', 0, REAP_MAX)
  redis.call('ZREMRANGEBYRANK', lv.inf, 0, #gone - 1)
  local freed = {0, 0}
  for _, id in ipairs(gone) do freed = m_add(freed, m_parse(reserved_by(id))) end
  local total = m_sub_floor(freed, {0, 0})  -- the exact sum, as a decimal string
  if total ~= '0' then redis.call('HINCRBY', lv.rec, 'reserved', '-' .. total) end
  lv.reserved = redis.call('HGET', lv.rec, 'reserved') or '0'
  return #gone
end

-- A level's state, from LEVEL_FIELDS read by the caller (`f`, with any more fields after
-- them) or read here; nil for a budget record that does not exist.
local function load_level(name, rec, inf, now, next_month, f)
  f = f or redis.call('HMGET', rec, unpack(LEVEL_FIELDS))
  if f[1] == false then return nil end
  local lv = {name = name, rec = rec, inf = inf, budget = f[1] or '0', spent = f[2] or '0',
    reserved = f[3] or '0', rpm = tonumber(f[6]) or 0, tpm = tonumber(f[7]) or 0,
    start = tonumber(f[8]) or 0, requests = tonumber(f[9]) or 0,
    tokens = tonumber(f[10]) or 0, parallel = tonumber(f[11]) or 0}
  if roll_budget(rec, now, f[4], f[5], next_month) then lv.spent = '0' end
  lv.expired = reap(lv, now)
  return lv
end

-- The budget step at one level: nil when it passes, else the nano-USD still free.
-- reserve mode: spent + reserved + this reservation <= max_budget, and something left;
-- after mode: spent < max_budget (nothing is reserved).
local function budget_short(lv, amount, mode)
  if lv.budget == '0' then return nil end
  local max = m_parse(lv.budget)
  local held = m_add(m_parse(lv.spent), m_parse(lv.reserved))
  if mode == 'after' then
    if m_le(max, m_parse(lv.spent)) then return '0' end
    return nil
  end
  -- a budget with nothing left refuses even a request that reserves nothing
  if m_le(m_add(held, m_parse(amount)), max) and not m_le(max, held) then return nil end
  return m_sub_floor(max, held)
end

-- The rate step at one level: nil, or {'rpm'|'tpm', limit, used, ms until the window resets}.
local function rate_short(lv, now, window)
  if now >= lv.start + window then
    lv.start, lv.requests, lv.tokens, lv.fresh = now, 0, 0, true
  end
  local reset = lv.start + window - now
  if lv.rpm > 0 and lv.requests >= lv.rpm then return {'rpm', lv.rpm, lv.requests, reset} end
  if lv.tpm > 0 and lv.tokens >= lv.tpm then return {'tpm', lv.tpm, lv.tokens, reset} end
  return nil
end

-- The concurrency step at one level: nil, or the limit that is full.
local function parallel_short(lv, now)
  if lv.parallel <= 0 then return nil end
  if redis.call('ZCOUNT', lv.inf, '(' .. now, '+inf') >= lv.parallel then return lv.parallel end
  return nil
end

-- Counts the request at one level and opens its in-flight record there (rate_short ran
-- first: it opens a fresh window when the last one has closed). A request without a body
-- (`opens` false: nothing to generate, nothing will report it) is only counted.
local function admit(lv, now, window, id, amount, expires, keep_ms, opens)
  if lv.fresh then
    redis.call('HSET', lv.rec, 'win_start', now, 'win_requests', 1, 'win_tokens', 0)
  else
    redis.call('HINCRBY', lv.rec, 'win_requests', 1)
  end
  lv.requests = lv.requests + 1
  if not opens then return end
  redis.call('ZADD', lv.inf, expires, (lv.prefix or '') .. id)
  redis.call('PEXPIRE', lv.inf, keep_ms)
  if amount ~= '0' then redis.call('HINCRBY', lv.rec, 'reserved', amount) end
end

-- Closes the request's reservation at one level, if open. Returns 1 settled (open and
-- not yet expired), 0 no open reservation, -1 it had expired (released, uncharged).
-- Above the key, members are `<key id>:<request id>` (lv.prefix).
local function release(lv, id, now)
  local member = (lv.prefix or '') .. id
  local expires = redis.call('ZSCORE', lv.inf, member)
  if not expires then return 0 end
  redis.call('ZREM', lv.inf, member)
  local amount = reserved_by(id)
  if amount ~= '0' then redis.call('HINCRBY', lv.rec, 'reserved', '-' .. amount) end
  if tonumber(expires) <= now then return -1 end
  return 1
end

-- What charge reads: its own fields, and with budget alerts on (`alerting`) what
-- budget_alerts needs too, in the same HMGET.
local CHARGE_FIELDS = {'budget_reset_at', 'budget_period_ms', 'win_start'}
local ALERT_FIELDS = {'budget_reset_at', 'budget_period_ms', 'win_start', 'spent',
  'max_budget', 'budget_set_at', 'created_at', 'alerted'}

-- Charges cost and tokens at one level (its budget period rolled first). Returns the
-- fields it read (as they were before the charge) and roll_budget's answer.
local function charge(rec, now, cost, tokens, window, next_month, alerting)
  local b = redis.call('HMGET', rec, unpack(alerting and ALERT_FIELDS or CHARGE_FIELDS))
  local rolled = roll_budget(rec, now, b[1], b[2], next_month)
  redis.call('HINCRBY', rec, 'spent', cost)
  if now >= (tonumber(b[3]) or 0) + window then
    redis.call('HSET', rec, 'win_start', now, 'win_requests', 0, 'win_tokens', tokens)
  else
    redis.call('HINCRBY', rec, 'win_tokens', tokens)
  end
  return b, rolled
end


-- The spend ledger (docs/design.md section 12). A script that changes a key appends to
-- the ledger stream of the key's slot (`stream`: the caller passes it as the last KEYS
-- entry, or nothing when no ledger is deployed, and then nothing is appended).
-- A key event's `record` is the record's fields minus these, which change on most
-- requests (rate window, reservations) or hold a rotated-out digest.
local LEDGER_VOLATILE = {win_start = true, win_requests = true, win_tokens = true,
  reserved = true, prev_hash = true, prev_hash_until = true}

-- Bumps the record's `ver` (with or without a ledger, so versions only ever grow) and
-- appends {type, key_id, ts, version, record}; the record as it is now: for `deleted`,
-- call it before the record goes.
local function key_event(stream, rec, kind, now)
  local version = redis.call('HINCRBY', rec, 'ver', 1)
  if not stream then return end
  local flat = redis.call('HGETALL', rec)
  local fields = {}
  for i = 1, #flat, 2 do
    if not LEDGER_VOLATILE[flat[i]] then fields[flat[i]] = flat[i + 1] end
  end
  redis.call('XADD', stream, '*', 'type', kind, 'key_id', string.match(rec, '^vk:{(.*)}$'),
    'ts', now, 'version', string.format('%d', version), 'record', cjson.encode(fields))
end


-- Budget alerts (docs/design.md section 13). A charge that takes a level's spend to a
-- threshold (basis points of max_budget) appends one event per threshold to the alert
-- stream of the level's slot, once per budget period and max_budget: the record's
-- `alerted` ("<period start>:<max_budget>:<highest basis points fired>") names the period
-- and budget it counts for, so a new period or a changed budget starts it afresh without
-- any script resetting it.
local DAY_MS = 86400000

-- The first instant (ms, UTC) of the calendar month before `month_start`, itself the first
-- instant of a month: back by the day of the month of the day before it (civil_from_days,
-- H. Hinnant's algorithm, in whole days since the epoch).
local function previous_month_start(month_start)
  local z = math.floor(month_start / DAY_MS) - 1 + 719468
  local doe = z - math.floor(z / 146097) * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local day = doy - math.floor((153 * mp + 2) / 5) + 1
  return month_start - day * DAY_MS
end

-- When the level's current budget period began (ms): a fixed period's reset minus its
-- length; a calendar month's first instant; without a period, when the budget was last
-- set (`budget_set_at`, else the record's `created_at`).
local function period_start(reset_at, period_ms, set_at, created_at)
  local reset = tonumber(reset_at) or 0
  if reset == 0 then return tonumber(set_at) or tonumber(created_at) or 0 end
  local period = tonumber(period_ms) or 0
  if period > 0 then return reset - period end
  return previous_month_start(reset)
end

-- ceil(max * bp / 10000) for money {hi, lo} and bp <= 100000 (10x), exactly: every
-- product stays below 2^53.
local function m_share(max, bp)
  local x, y = max[1] * bp, max[2] * bp
  local hi = math.floor(x / 1e4)
  local lo = (x - hi * 1e4) * 1e5 + math.ceil(y / 1e4)
  local carry = math.floor(lo / 1e9)
  return {hi + carry, lo - carry * 1e9}
end

-- After `cost` was charged at one level (`rec`, named scope/id in the events; `b` and
-- `rolled`: what charge read, ALERT_FIELDS, and whether it rolled the period): appends an
-- event to `stream` for each threshold of `thresholds` ("5000,8000,10000": basis points
-- of max_budget, ascending) that spent has reached and that has not fired in this period
-- for this max_budget. Returns how many it appended. A charge that leaves spent below the
-- lowest threshold (most charges) costs no command.
local function budget_alerts(rec, scope, id, stream, thresholds, now, cost, b, rolled)
  local budget = b[5]
  if not budget or budget == '0' then return 0 end
  local max = m_parse(budget)
  local spent = m_add(rolled and {0, 0} or m_parse(b[4]), m_parse(cost))
  if not m_le(m_share(max, tonumber(string.match(thresholds, '%d+'))), spent) then return 0 end
  local start = string.format('%d', period_start(rolled or b[1], b[2], b[6], b[7]))
  local this = start .. ':' .. budget .. ':'
  local marker, done = b[8] or '', 0
  if string.sub(marker, 1, #this) == this then done = tonumber(string.sub(marker, #this + 1)) or 0 end
  local spent_text = m_sub_floor(spent, {0, 0})  -- as the record now has it
  local fired = 0
  for bp in string.gmatch(thresholds, '%d+') do
    local t = tonumber(bp)
    if t > done then
      if not m_le(m_share(max, t), spent) then break end  -- ascending: none further either
      redis.call('XADD', stream, '*', 'scope', scope, 'id', id, 'threshold', bp,
        'spent', spent_text, 'max_budget', budget, 'period_start', start, 'ts', now)
      done, fired = t, fired + 1
    end
  end
  if fired > 0 then redis.call('HSET', rec, 'alerted', this .. string.format('%d', done)) end
  return fired
end

-- Set fields on an existing key record; never creates one. (keys/lua/_lib.lua is
-- prepended: key_event)
-- KEYS[1]  the key's record hash, vk:{<id>}
-- KEYS[2]  the ledger stream of its slot (absent: no ledger, nothing is appended)
-- ARGV[1]  now, ms since the epoch
-- ARGV[2]  the ledger event: updated, or revoked (RevokeKey)
-- ARGV[3..] field, value, field, value, ...; the pseudo-field `-ml` first removes every
--          per-model limit (`ml:<model>`), so a new model_limits map replaces the old
-- returns 1 updated, 0 no such key
-- A change of max_budget or budget_duration sets `budget_set_at` (now): where the budget
-- has no period, budget alerts count their period from it (docs/design.md section 13).
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local before = redis.call('HMGET', KEYS[1], 'max_budget', 'budget_duration')
local fields = {}
for i = 3, #ARGV, 2 do
  if ARGV[i] == '-ml' then
    for _, name in ipairs(redis.call('HKEYS', KEYS[1])) do
      if string.sub(name, 1, 3) == 'ml:' then redis.call('HDEL', KEYS[1], name) end
    end
  else
    fields[#fields + 1] = ARGV[i]
    fields[#fields + 1] = ARGV[i + 1]
  end
end
if #fields > 0 then redis.call('HSET', KEYS[1], unpack(fields)) end
local after = redis.call('HMGET', KEYS[1], 'max_budget', 'budget_duration')
if before[1] ~= after[1] or before[2] ~= after[2] then
  redis.call('HSET', KEYS[1], 'budget_set_at', ARGV[1])
end
key_event(KEYS[2], KEYS[1], ARGV[2], ARGV[1])
return 1

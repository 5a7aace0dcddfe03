-- Set fields on an existing key record; never creates one.
-- KEYS[1]  the key's record hash, vk:{<id>}
-- ARGV     field, value, field, value, ...; the pseudo-field `-ml` first removes every
--          per-model limit (`ml:<model>`), so a new model_limits map replaces the old
-- returns 1 updated, 0 no such key
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local fields = {}
for i = 1, #ARGV, 2 do
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
return 1

-- Undo an admission that a later level refused (Redis Cluster: each level is its own
-- script, so a refusal after earlier levels admitted the request is compensated here).
-- (keys/lua/_lib.lua is prepended)
-- KEYS[1]  a level's record (the key's, or a budget's)   KEYS[2] its open reservations
-- ARGV[1]  the member: the request id at the key, `<key id>:<request id>` above it
-- ARGV[2]  when it was admitted, ms   ARGV[3] rate window, ms
-- returns 1 released, 0 nothing was open under that id (already released or expired)
local released = release({rec = KEYS[1], inf = KEYS[2]}, ARGV[1], tonumber(ARGV[2]))
if released == 0 then return 0 end
-- the request was counted against RPM in the window open at admission: uncount it there
local w = redis.call('HMGET', KEYS[1], 'win_start', 'win_requests', 'total_requests')
local start, admitted = tonumber(w[1]) or 0, tonumber(ARGV[2])
if admitted >= start and admitted < start + tonumber(ARGV[3]) and (tonumber(w[2]) or 0) > 0 then
  redis.call('HINCRBY', KEYS[1], 'win_requests', -1)
end
-- a key's count of allowed requests (budgets keep none): this one was not allowed
if (tonumber(w[3]) or 0) > 0 then redis.call('HINCRBY', KEYS[1], 'total_requests', -1) end
return 1

-- Ends an admission. Acts only if the user still holds exactly this slot, so a late or
-- repeated call can never free a slot that now belongs to someone else (I1).
-- KEYS: meta, users, free, pending.
-- ARGV: user_id, slot, mode ('release' | 'forget'), reissue delay (us).
-- A released slot becomes issuable after the delay: no process may still be answering
-- "sold out" from memory when someone new can get it (see RefusalMemory).
local meta, users, free, pending = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local user, slot, mode, delay = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
if redis.call('EXISTS', meta) == 0 then return 0 end
local held = redis.call('HGET', users, user)
if not held or string.match(held, '^(%d+)') ~= slot then return 0 end
redis.call('HDEL', users, user)
redis.call('ZREM', pending, user)
if mode == 'release' then
  local t = redis.call('TIME')
  redis.call('ZADD', free, tonumber(t[1]) * 1000000 + tonumber(t[2]) + delay, slot)
end
return 1

-- Ends an admission. Acts only if the user still holds exactly this slot, so a late or
-- repeated call can never free a slot that now belongs to someone else (I1).
-- KEYS: meta, users, free, pending.  ARGV: user_id, slot, mode ('release' | 'forget').
local meta, users, free, pending = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local user, slot, mode = ARGV[1], ARGV[2], ARGV[3]
if redis.call('EXISTS', meta) == 0 then return 0 end
local held = redis.call('HGET', users, user)
if not held or string.match(held, '^(%d+)') ~= slot then return 0 end
redis.call('HDEL', users, user)
redis.call('ZREM', pending, user)
if mode == 'release' then redis.call('RPUSH', free, slot) end
return 1

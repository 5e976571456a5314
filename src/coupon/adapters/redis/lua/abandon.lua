-- Gives back the admissions of one admission call whose reply never arrived (a timeout, a
-- broken connection): nobody will record them, and their users must be able to ask again
-- at once rather than after the lease. Only admissions still pending under that call's
-- token are touched; anything confirmed, released or admitted again is left alone.
-- KEYS: meta, users, free, pending.  ARGV: token, reissue delay (us), users 'u NUL u ...'.
local meta, users, free, pending = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local mine, delay = ':' .. ARGV[1], tonumber(ARGV[2])
if redis.call('EXISTS', meta) == 0 then return 0 end
local t = redis.call('TIME')
local at = tonumber(t[1]) * 1000000 + tonumber(t[2]) + delay
local given = 0
for user in string.gmatch(ARGV[3], '[^%z]+') do
  local held = redis.call('HGET', users, user)
  if held and string.sub(held, -#mine) == mine and not string.find(held, '|', 1, true) then
    redis.call('HDEL', users, user)
    redis.call('ZREM', pending, user)
    redis.call('ZADD', free, at, string.match(held, '^(%d+)'))
    given = given + 1
  end
end
return given

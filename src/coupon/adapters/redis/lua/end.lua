-- The kill switch: nobody is admitted from the end on (I3's window, shortened). The end is
-- read from Redis's clock here, the clock admit.lua decides every admission by, so a request
-- is admitted before the end or refused after it, never both. The end is kept in its own key
-- even when the gate has no state (a rebuild applies it, see meta.lua); the first end stays.
-- KEYS: meta, ended.  ARGV: the end in microseconds, or '' for now: then the end is the next
-- microsecond, so that an admission read at this same microsecond (TIME's resolution) is
-- before the end, as the coupon's issued_at will be.
-- Reply: {now, end in force}.
local meta, ended = KEYS[1], KEYS[2]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local at = tonumber(ARGV[1]) or now + 1
local recorded = tonumber(redis.call('GET', ended) or '')
if recorded and recorded < at then at = recorded end
redis.call('SET', ended, at)
local m = redis.call('HMGET', meta, 'starts', 'ends')
if m[1] then
  local ends = tonumber(m[2])
  if ends < 0 or at < ends then redis.call('HSET', meta, 'ends', at) end
  -- Ended before it started: the window is empty, and admit.lua says "ended", not "not
  -- started yet", from now on.
  if at < tonumber(m[1]) then redis.call('HSET', meta, 'starts', at) end
end
return {now, at}

-- Writes a rebuilt gate's meta (written last: admissions wait for it) and applies the end
-- EndCampaign recorded, in one step, so an end recorded while the gate was being rebuilt is
-- never lost (see end.lua).
-- KEYS: meta, ended.  ARGV: field, value, ... of the meta.
local meta, ended = KEYS[1], KEYS[2]
redis.call('HSET', meta, unpack(ARGV))
local at = tonumber(redis.call('GET', ended) or '')
if at then
  local m = redis.call('HMGET', meta, 'starts', 'ends')
  local ends = tonumber(m[2])
  if ends < 0 or at < ends then redis.call('HSET', meta, 'ends', at) end
  if at < tonumber(m[1]) then redis.call('HSET', meta, 'starts', at) end
end
return 1

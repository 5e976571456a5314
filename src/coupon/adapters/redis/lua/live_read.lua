-- Reads a campaign's per-second hashes (one hash tag: one node, one call).
-- KEYS: the hashes.  Reply: one flat field, count, ... list per key ({} when absent).
local out = {}
for i = 1, #KEYS do
  out[i] = redis.call('HGETALL', KEYS[i])
end
return out

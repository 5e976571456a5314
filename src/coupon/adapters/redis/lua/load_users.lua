-- Writes a rebuild's holders into the users hash: every field and value in one string, so the
-- client packs one argument instead of two per holder (the rebuild's largest cost).
-- KEYS: users.  ARGV[1]: user, value, user, value, ... joined by NUL (user ids never hold
-- one, and values are 'slot|code|micros').  Returns the number of holders written.
local users, packed = KEYS[1], ARGV[1]
local args, n, at, added = {}, 0, 1, 0
local len = #packed
while at <= len do
  local stop = string.find(packed, '\0', at, true)
  if not stop then stop = len + 1 end
  n = n + 1
  args[n] = string.sub(packed, at, stop - 1)
  at = stop + 1
  if n == 1000 then
    redis.call('HSET', users, unpack(args, 1, n))
    added, n = added + n / 2, 0
  end
end
if n % 2 == 1 then return redis.error_reply('an odd number of fields and values') end
if n > 0 then
  redis.call('HSET', users, unpack(args, 1, n))
  added = added + n / 2
end
return added

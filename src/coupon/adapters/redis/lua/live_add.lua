-- Adds one server process's counts of one second to the campaign's hash for that second,
-- and keeps the hash for a while only.
-- KEYS: the hash.  ARGV: seconds to keep it, then field, count, field, count, ...
for i = 2, #ARGV, 2 do
  redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1])
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1

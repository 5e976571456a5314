-- One round trip decides a request: window (I3) against Redis's clock, the one clock all
-- server processes share; one per user (I4); and a stock slot (I1), all atomically.
-- KEYS: meta, users, free, pending.  ARGV: user_id, lease (microseconds), stale batch size.
-- Replies: {'L', now} not loaded; {'B', now} before start; {'E', now} ended;
-- {'H', now, slot, pending, stale...} already held; {'S', now, stale...} sold out;
-- {'A', now, slot} admitted. `stale` is a flat list user, slot, ... of admissions older
-- than the lease that were never confirmed: the caller settles them against the ledger.
local meta, users, free, pending = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local user, lease, batch = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])

local m = redis.call('HMGET', meta, 'total', 'starts', 'ends', 'next')
if not m[1] then return {'L', now} end
if now < tonumber(m[2]) then return {'B', now} end
local ends = tonumber(m[3])
if ends >= 0 and now >= ends then return {'E', now} end

local held = redis.call('HGET', users, user)
if held then
  local reply = {'H', now, tonumber(held), 0}
  local since = redis.call('ZSCORE', pending, user)
  if since then
    reply[4] = 1
    if now - tonumber(since) > lease then
      reply[5] = user
      reply[6] = tonumber(held)
    end
  end
  return reply
end

local slot = redis.call('RPOP', free)
if not slot then
  local nxt = tonumber(m[4])
  if nxt < tonumber(m[1]) then
    slot = redis.call('HINCRBY', meta, 'next', 1)
  else
    local reply = {'S', now}
    local old = redis.call('ZRANGEBYSCORE', pending, '-inf', now - lease, 'LIMIT', 0, batch)
    for _, u in ipairs(old) do
      reply[#reply + 1] = u
      reply[#reply + 1] = tonumber(redis.call('HGET', users, u) or 0)
    end
    return reply
  end
end

redis.call('HSET', users, user, slot)
redis.call('ZADD', pending, now, user)
return {'A', now, tonumber(slot)}

-- Admission of a batch of requests for one campaign, in one round trip. Decides, atomically
-- and against Redis's clock (the one clock every server process shares), the window (I3),
-- one coupon per user (I4) and a stock slot for each newcomer (I1).
-- KEYS: meta, users, free, pending.
-- ARGV: lease (microseconds), stale batch size, confirmed coupons, users to admit. The last
-- two are lists joined by NUL (user ids never contain one): confirms as
-- 'user NUL slot|code|issued_us NUL user NUL ...', users as 'user NUL user ...'; one string
-- each is cheaper to send and to read than one argument per item. Confirms (the coupon is
-- committed) ride along so that confirming costs no round trip of its own and is ordered
-- before what follows.
-- users maps user -> 'slot' while the admission is pending, 'slot|code|issued_us' after.
-- Reply: {now, 'L'} not loaded | {now, 'B'} before the start | {now, 'E'} ended |
--        {now, 'M', results, stale} where results[i] is, for the i-th user,
--          slot                     admitted (a number, 1 or more)
--          0                        sold out
--          {slot, pending, s, value}  already held; s = 1 when its admission is older
--                                   than the lease and still unconfirmed; value as in users
--        (plain numbers for the common answers: no table to build and send per user)
--        and stale is a flat list user, slot, ... of unconfirmed admissions older than the
--        lease (only when something sold out): the caller settles them against the ledger.
local meta, users, free, pending = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local lease, batch = tonumber(ARGV[1]), tonumber(ARGV[2])

local function slot_of(value) return string.match(value, '^(%d+)') end

-- Commands take many items at once (one HMGET, HSET, ZADD, ZREM per call, not per user):
-- each redis.call has a cost of its own. In chunks, as Lua's unpack takes at most about
-- 8,000 values; an even size keeps field-value and score-member pairs together.
local CHUNK = 4000

local function hmget(key, fields)
  local out = {}
  for i = 1, #fields, CHUNK do
    local got = redis.call('HMGET', key, unpack(fields, i, math.min(i + CHUNK - 1, #fields)))
    for j = 1, #got do out[#out + 1] = got[j] end
  end
  return out
end

local function in_chunks(command, key, items)
  for i = 1, #items, CHUNK do
    redis.call(command, key, unpack(items, i, math.min(i + CHUNK - 1, #items)))
  end
end

-- %z is NUL in the patterns of Redis's Lua (5.1).
local confirmed, values = {}, {}
for user, value in string.gmatch(ARGV[3], '([^%z]+)%z([^%z]+)') do
  confirmed[#confirmed + 1] = user
  values[#values + 1] = value
end
if #confirmed > 0 then
  local current = hmget(users, confirmed)
  local settled, done = {}, {}
  for i = 1, #confirmed do
    -- Only the admission this coupon was recorded for, while it is pending (its value is
    -- then the slot alone): never revive a released one; a confirmed one stays as it is.
    if current[i] == slot_of(values[i]) then
      settled[#settled + 1] = confirmed[i]
      settled[#settled + 1] = values[i]
      done[#done + 1] = confirmed[i]
    end
  end
  if #done > 0 then
    in_chunks('ZREM', pending, done)
    in_chunks('HSET', users, settled)
  end
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])

local m = redis.call('HMGET', meta, 'total', 'starts', 'ends', 'next')
if not m[1] then return {now, 'L'} end
if now < tonumber(m[2]) then return {now, 'B'} end
local ends = tonumber(m[3])
if ends >= 0 and now >= ends then return {now, 'E'} end

local total, nxt = tonumber(m[1]), tonumber(m[4])
local taken_next = false
-- Slots given back (released admissions); usually none, and then no RPOP per user.
local nfree = redis.call('LLEN', free)
local results = {}
local stale = nil

local asking = {}
for user in string.gmatch(ARGV[4], '[^%z]+') do asking[#asking + 1] = user end
local holding = hmget(users, asking)
local admitted = {}  -- user -> slot, admitted by this call
local slots, since = {}, {}  -- HSET users and ZADD pending arguments

for i = 1, #asking do
  local user = asking[i]
  local held = holding[i]
  local mine = admitted[user]
  if mine then
    -- The same user twice in one call: the second finds the first's pending admission.
    results[#results + 1] = {mine, 1, 0, tostring(mine)}
  elseif held then
    local slot = tonumber(slot_of(held))
    local at = redis.call('ZSCORE', pending, user)
    if at then
      local old = 0
      if now - tonumber(at) > lease then old = 1 end
      results[#results + 1] = {slot, 1, old, held}
    else
      results[#results + 1] = {slot, 0, 0, held}
    end
  else
    local slot = nil
    if nfree > 0 then
      slot = redis.call('RPOP', free)
      nfree = nfree - 1
    end
    if not slot and nxt < total then
      nxt = nxt + 1
      taken_next = true
      slot = nxt
    end
    if slot then
      slot = tonumber(slot)
      admitted[user] = slot
      slots[#slots + 1] = user
      slots[#slots + 1] = slot
      since[#since + 1] = now
      since[#since + 1] = user
      results[#results + 1] = slot
    else
      results[#results + 1] = 0
      if not stale then
        stale = {}
        local old = redis.call('ZRANGEBYSCORE', pending, '-inf', now - lease, 'LIMIT', 0, batch)
        for _, u in ipairs(old) do
          stale[#stale + 1] = u
          stale[#stale + 1] = tonumber(redis.call('HGET', users, u) or 0)
        end
      end
    end
  end
end

if #slots > 0 then
  in_chunks('HSET', users, slots)
  in_chunks('ZADD', pending, since)
end
if taken_next then redis.call('HSET', meta, 'next', nxt) end
return {now, 'M', results, stale or {}}

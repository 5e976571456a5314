-- Admission of a batch of requests for one campaign, in one round trip. Decides, atomically
-- and against Redis's clock (the one clock every server process shares), the window (I3),
-- one coupon per user (I4) and a stock slot for each newcomer (I1).
--
-- KEYS (one hash tag, so one Redis Cluster slot): meta, users, free, pending.
--   meta     hash: total, starts, ends (microseconds; ends -1: none), next (the highest slot
--            handed out), gen (new at each rebuild), adm (admissions and holders put back
--            since the rebuild). gen and adm together are the gate's version: a set of
--            holders read at one version is complete for as long as the version holds.
--   users    hash: user -> 'slot:token' while the admission is pending (token names the
--            call that admitted it), 'slot|code|issued_us' once its coupon is committed.
--   free     sorted set: slots given back, scored by when they become issuable again (a
--            delay that outlasts every process's memory of "sold out", see RefusalMemory).
--   pending  sorted set: users whose admission is pending, scored by admission time.
-- ARGV: [1] lease (us)  [2] stale batch size  [3] confirms 'user NUL value NUL ...'
--       [4] users 'user NUL user ...'  [5] deadline (Redis clock, us; 0: none)  [6] token
--   User ids never contain NUL; one joined string is cheaper to send and read than one
--   argument per item. Confirms (the coupon is committed) ride along so that confirming
--   costs no round trip of its own and is ordered before what follows.
--
-- Reply, first the kind:
--   {NOT_LOADED, now}                         no state: rebuild from the ledger
--   {TOO_LATE, now}                           run after its deadline (Redis was stalled):
--                                             nothing admitted, so nothing is left behind
--   {NOT_STARTED, now, gen, adm, starts}
--   {DECIDED, now, gen, adm, starts, ends, reopens, results, stale}
--     results[i], for the i-th user: a slot (1 or more) admitted | SOLD_OUT | ENDED |
--       {slot, pending, stale, value} already held; stale = 1 when still pending after the
--       lease; value as in users. The same token's own pending admission (the call sent
--       again after a lost reply) is answered with its slot again.
--     reopens: when the earliest given-back slot becomes issuable, or, none waiting, when
--       an admission pending past STUCK reaches its lease (0: neither).
--     stale: flat list user, slot, ... of admissions pending past the lease (only when
--       something sold out): the caller settles them against the ledger (I6).
local DECIDED, NOT_LOADED, NOT_STARTED, TOO_LATE = 1, 2, 3, 4
local SOLD_OUT, ENDED = 0, -1
local STUCK = 2000000  -- us: ports.STUCK

local meta, users, free, pending = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local lease, stale_batch = tonumber(ARGV[1]), tonumber(ARGV[2])
local deadline, token = tonumber(ARGV[5]), ARGV[6]

local function slot_of(value) return string.match(value, '^(%d+)') end
local function is_pending(value) return not string.find(value, '|', 1, true) end

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

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])

local m = redis.call('HMGET', meta, 'total', 'starts', 'ends', 'next', 'gen', 'adm')
-- No gen: no state, or the state of an older version of this script; either way, rebuild.
if not m[5] then return {NOT_LOADED, now} end
local adm = tonumber(m[6])
local adm_before = adm

-- Confirms are facts (the coupon is committed), applied whatever the batch's fate.
local confirmed, values = {}, {}
for user, value in string.gmatch(ARGV[3], '([^%z]+)%z([^%z]+)') do
  confirmed[#confirmed + 1] = user
  values[#values + 1] = value
end
if #confirmed > 0 then
  local current = hmget(users, confirmed)
  local settled, done, taken = {}, {}, {}
  for i = 1, #confirmed do
    local slot = slot_of(values[i])
    local now_held = current[i]
    if not now_held then
      -- A holder the gate lost (a rebuild that ran while the coupon was being committed):
      -- put back, and its slot is no longer free. A new holder: the version moves on.
      settled[#settled + 1] = confirmed[i]
      settled[#settled + 1] = values[i]
      taken[#taken + 1] = slot
      adm = adm + 1
    elseif is_pending(now_held) and slot_of(now_held) == slot then
      -- The admission this coupon was recorded for. Never revive a released admission
      -- into another user's slot, and leave another pending admission of the same user
      -- to end on its own (the ledger refuses it, and it gives its slot back).
      settled[#settled + 1] = confirmed[i]
      settled[#settled + 1] = values[i]
      done[#done + 1] = confirmed[i]
    end
  end
  if #done > 0 then in_chunks('ZREM', pending, done) end
  if #settled > 0 then in_chunks('HSET', users, settled) end
  if #taken > 0 then in_chunks('ZREM', free, taken) end
end

local function save_version()
  if adm ~= adm_before then redis.call('HSET', meta, 'adm', adm) end
end

if deadline > 0 and now > deadline then
  save_version()
  return {TOO_LATE, now}
end
local starts = tonumber(m[2])
if now < starts then
  save_version()
  return {NOT_STARTED, now, m[5], adm, starts}
end
local total, ends, nxt = tonumber(m[1]), tonumber(m[3]), tonumber(m[4])
local ended = ends >= 0 and now >= ends
local taken_next = false
local ready = nil  -- given-back slots issuable now; counted when a newcomer first needs one
local sold_out = false
local mine = ':' .. token

local asking = {}
for user in string.gmatch(ARGV[4], '[^%z]+') do asking[#asking + 1] = user end
local holding = hmget(users, asking)
local admitted = {}  -- user -> slot, admitted by this call
local results = {}
local slots, since = {}, {}  -- HSET users and ZADD pending arguments

for i = 1, #asking do
  local user = asking[i]
  local held = holding[i]
  local again = admitted[user]
  if again then
    -- The same user twice in one call: the second finds the first's pending admission.
    results[i] = {again, 1, 0, again .. mine}
  elseif held then
    local slot = tonumber(slot_of(held))
    if is_pending(held) and held == slot .. mine then
      results[i] = slot  -- this very call, sent again: the same admission
    elseif is_pending(held) then
      local at = redis.call('ZSCORE', pending, user)
      local old = 0
      if at and now - tonumber(at) > lease then old = 1 end
      results[i] = {slot, 1, old, held}
    else
      results[i] = {slot, 0, 0, held}
    end
  elseif ended then
    results[i] = ENDED
  else
    local slot = nil
    if ready == nil then ready = redis.call('ZCOUNT', free, '-inf', now) end
    if ready > 0 then
      -- The lowest scores are the ones issuable now (ready counted them).
      slot = tonumber(redis.call('ZPOPMIN', free)[1])
      ready = ready - 1
    elseif nxt < total then
      nxt = nxt + 1
      taken_next = true
      slot = nxt
    end
    if slot then
      admitted[user] = slot
      slots[#slots + 1] = user
      slots[#slots + 1] = slot .. mine
      since[#since + 1] = now
      since[#since + 1] = user
      results[i] = slot
      adm = adm + 1
    else
      results[i] = SOLD_OUT
      sold_out = true
    end
  end
end

if #slots > 0 then
  in_chunks('HSET', users, slots)
  in_chunks('ZADD', pending, since)
end
if taken_next then redis.call('HSET', meta, 'next', nxt) end
save_version()

local reopens, stale = 0, {}
if sold_out then
  local first = redis.call('ZRANGE', free, 0, 0, 'WITHSCORES')
  if first[2] then reopens = tonumber(first[2]) end
  if reopens == 0 then
    -- An admission pending longer than a commit takes (its process died, or PostgreSQL
    -- stalls) may still come back: not final until the lease settles it (ports.STUCK).
    local oldest = redis.call('ZRANGE', pending, 0, 0, 'WITHSCORES')
    if oldest[2] and now - tonumber(oldest[2]) > STUCK then reopens = tonumber(oldest[2]) + lease end
  end
  local old = redis.call('ZRANGEBYSCORE', pending, '-inf', now - lease, 'LIMIT', 0, stale_batch)
  for _, u in ipairs(old) do
    stale[#stale + 1] = u
    stale[#stale + 1] = tonumber(slot_of(redis.call('HGET', users, u) or '0'))
  end
end
return {DECIDED, now, m[5], adm, starts, ends, reopens, results, stale}

-- wrk script: IssueCoupon as binary protobuf (application/proto), a new user per request.
--
--   wrk -t2 -c128 -d30s -s bench/issue.lua http://127.0.0.1:8000 -- <campaign_id> <user_prefix>
--
-- The body is IssueCouponRequest encoded by hand: field 1 (campaign_id, tag 0x0a) and
-- field 2 (user_id, tag 0x12), each a varint length then the bytes. User ids are
-- "<user_prefix>-<thread>-<n>", so no two requests of a run share a user. done() prints one
-- line "BENCH_RESULT {json}" for the bench to read (latencies in microseconds).

local thread_count = 0

function setup(thread)
    thread_count = thread_count + 1
    thread:set("thread_number", thread_count)
end

local function varint(n)
    local out = {}
    while n >= 0x80 do
        out[#out + 1] = string.char(n % 0x80 + 0x80)
        n = math.floor(n / 0x80)
    end
    out[#out + 1] = string.char(n)
    return table.concat(out)
end

local function field(tag, value)
    return string.char(tag) .. varint(#value) .. value
end

local campaign_field
local user_prefix
local sent = 0

function init(args)
    campaign_field = field(0x0a, args[1])
    user_prefix = args[2] .. "-" .. thread_number .. "-"
    wrk.method = "POST"
    wrk.path = "/coupon.v1.CouponService/IssueCoupon"
    wrk.headers["Content-Type"] = "application/proto"
    wrk.headers["Connect-Protocol-Version"] = "1"
end

function request()
    sent = sent + 1
    return wrk.format(nil, nil, nil, campaign_field .. field(0x12, user_prefix .. sent))
end

function done(summary, latency, requests)
    local e = summary.errors
    io.write(string.format(
        'BENCH_RESULT {"duration_us": %d, "requests": %d, "bytes": %d, '
            .. '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, '
            .. '"latency_us": {"p50": %d, "p90": %d, "p99": %d, "p99.9": %d, '
            .. '"max": %d, "mean": %.1f}}\n',
        summary.duration, summary.requests, summary.bytes,
        e.connect, e.read, e.write, e.status, e.timeout,
        latency:percentile(50), latency:percentile(90), latency:percentile(99),
        latency:percentile(99.9), latency.max, latency.mean
    ))
end

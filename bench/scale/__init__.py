"""`just bench-scale`: the service at scale: a million-coupon sell-out, paging at 10M rows,
and the export of a 10M-coupon campaign.

sellout: `coupon serve --workers 2` and a campaign of --coupons (1,000,000)
coupons, driven to sell-out by wrk (bench/issue.lua: binary IssueCoupon, a new user per
request; wrk is stopped with SIGINT once PostgreSQL counts the whole stock). Every second the
RSS of each server process is read from /proc next to the campaign's issued_count, so memory
can be set against the coupons issued. Then I1-I4 are checked in PostgreSQL, and every
GetCampaign page of the campaign (page_size 1000, binary protobuf over HTTP, following
next_page_token) is fetched and timed, checking that the pages list every coupon once.

paging: the coupons table is filled up to --rows (10,000,000) rows with SQL
(INSERT ... SELECT FROM generate_series, through every constraint, index and trigger of the
schema; nothing disabled) across campaigns of --campaign-size coupons, --interleave campaigns
at a time with their rows interleaved, as when campaigns sell at the same time. Then, on a
fresh server, campaigns at the start, middle and end of the table (and the sell-out campaign)
are paged through, their first, middle and last pages fetched --repeats times each, and
EXPLAIN (ANALYZE, BUFFERS) shows the plan of the page query the server runs (its text read
from pg_stat_activity, as the server's connection last sent it).

export: a campaign of --export-rows (10,000,000) coupons is filled with SQL (as above), and
ExportCoupons streams all of it from a fresh server (binary Connect streaming over HTTP,
read and decoded as it arrives, each coupon checked to come in issue order): rows/s, and
the RSS of every server process sampled twice a second (and its VmHWM, which catches a peak
between samples), which stays flat whatever the campaign's size (the server reads keyset
chunks and sends each before reading the next).

Everything lives apart from a developer's data: the database `coupon_scale`, created here
and marked with a comment (dropped at the end unless --keep; a database of that name without
the mark is never dropped), and the Redis keys under `coupon-scale:` (deleted with SCAN at
the start and the end).

It prints its tables and writes the run as JSON to bench/results/ (ignored by git).

Exit status: 0 when it ran (missed targets are reported, not fatal), 1 when an invariant was
violated, 2 when the bench itself broke.
"""

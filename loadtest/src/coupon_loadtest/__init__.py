"""`coupon loadtest`: a load generator that also proves the service kept its invariants.

cli (options, exit code) -> runner (campaign set-up, worker processes, read-back) ->
worker (open- or closed-loop sender, one uvloop per process) -> verify (pure checks) ->
report (JSON, summary) and chart (PNG).
"""

"""`just bench`: measure the service (no-op ceiling, IssueCoupon at saturation and at a
fixed rate) and verify the invariants afterwards. Not a test; see bench/RESULTS.md."""

"""`just bench` (bench/main.py) and `just bench-scale` (bench/scale/): measurements of the
service, with the invariants verified afterwards. Not tests; docs/performance.md has the
method and the figures."""

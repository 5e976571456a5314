"""`just bench-scale`: see bench/scale/__init__.py."""

import sys

from bench.scale.main import main

sys.exit(main())

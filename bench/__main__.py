"""`just bench`: see bench/main.py."""

import sys

from bench.main import main

sys.exit(main())

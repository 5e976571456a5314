import sys

from coupon.entrypoints.cli import main

sys.exit(main())

import sys

from coupon_loadtest.cli import main

# Worker processes are spawned: they re-import the main module and must not run it again.
if __name__ == "__main__":
    sys.exit(main())

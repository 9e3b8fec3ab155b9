"""``python -m uffdd.keeper``: what the daemon's twin executes once the daemon died."""

import sys

from uffdd.keeper.run import main

sys.exit(main())

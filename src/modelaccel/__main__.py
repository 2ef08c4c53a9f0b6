"""`python -m modelaccel ...`: the same as the `modelaccel` command."""

import sys

from modelaccel.cli import main

sys.exit(main())

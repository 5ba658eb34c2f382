"""`python -m harness.checkpoint info|export ...` (see harness/checkpoint/tools.py)."""

import sys

from harness.checkpoint.tools import main

sys.exit(main())

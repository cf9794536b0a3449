"""``python -m bench`` (run from the repository root)."""

import sys

from bench.harness import main

sys.exit(main())

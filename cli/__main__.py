"""``python -m sparsealloc.cli``."""

import sys

from sparsealloc.cli.main import main

sys.exit(main())

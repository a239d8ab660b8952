"""`python -m modelfleet` is the `modelfleet` command."""

import sys

from modelfleet.cli import main

sys.exit(main())

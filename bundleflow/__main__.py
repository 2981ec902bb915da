"""`python -m bundleflow` is the `bundleflow` console script."""

import sys

from bundleflow.cli import main

sys.exit(main())

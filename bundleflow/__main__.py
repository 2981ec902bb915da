"""`python -m bundleflow` is the `bundleflow` console script."""

import sys

from bundleflow.cli.app import main

sys.exit(main())

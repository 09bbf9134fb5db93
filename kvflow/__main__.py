"""`python -m kvflow ...` runs the `kvflow` command line."""
import sys

from kvflow.entrypoints.cli import main

sys.exit(main())

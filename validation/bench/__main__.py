"""`python -m validation.bench`: see validation/bench/cli.py."""
import sys

from .cli import main

sys.exit(main())

"""`python -m validation`: see validation/cli.py."""
import sys

from .cli import main

sys.exit(main())

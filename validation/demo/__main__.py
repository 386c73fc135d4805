"""`python -m validation.demo`: see validation/demo/cli.py."""
import sys

from .cli import main

sys.exit(main())

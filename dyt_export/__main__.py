"""`python -m dyt_export` is the `dyt-export` command."""
import sys

from .cli import main

sys.exit(main())

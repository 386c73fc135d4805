"""`python -m validation.demo`: see validation/demo/model.py."""
import sys

from .model import main

sys.exit(main())

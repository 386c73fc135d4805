"""`python -m runtimes [NAME ...]`: say whether each runtime can run here, and why not.

One line per runtime, "NAME: available" or "NAME: not available: <reason>"; exit 0 when
every one asked for is available, 2 otherwise (as `python -m validation` does for a runtime
it cannot use). `make setup-cuda` ends with `python -m runtimes ort-cuda`.
"""
from __future__ import annotations

import sys

from . import BACKEND_NAMES, BackendError, get_backend


def main(argv: list[str] | None = None) -> int:
    names = list(sys.argv[1:] if argv is None else argv)
    if any(name in ("-h", "--help") for name in names):
        print(f"usage: python -m runtimes [NAME ...]   (NAME: {', '.join(BACKEND_NAMES)}; default all)")
        return 0
    try:
        backends = [(name, get_backend(name)) for name in names or BACKEND_NAMES]
    except BackendError as e:
        print(f"python -m runtimes: error: {e}", file=sys.stderr)
        return 2
    missing = 0
    for name, backend in backends:
        available = backend.availability()
        print(f"{name}: available" if available else f"{name}: not available: {available.reason}")
        missing += not available
    return 2 if missing else 0


if __name__ == "__main__":
    sys.exit(main())

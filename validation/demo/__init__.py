"""The demo: a small DyT trained here on scikit-learn's digits, exported, and validated on
the CPU runtimes (`make demo`, `python -m validation.demo`).

Owns the demo model's training recipe (`train`), its cache (`model`: `ensure_demo_model`,
the default model of `python -m validation` and of the pictures, and the model of the
benchmark's int8 accuracy check) and the demo command (`cli`). May import `dyt_export`,
`runtimes` and the validation product (`validation.harness` and what it uses); nothing of
the benchmark. `ensure_demo_model` and `DemoModel` resolve on first use, so
`python -m validation.demo --help` does not pay for importing torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"DemoModel": "model", "ensure_demo_model": "model"}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'validation.demo' has no attribute {name!r}")

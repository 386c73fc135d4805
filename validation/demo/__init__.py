"""The demo: a small DyT trained here on scikit-learn's digits, exported, and validated on
the CPU runtimes (`make demo`, `python -m validation.demo`).

Owns the demo model's training recipe (`train`), its cache (`model`: `ensure_demo_model`,
which the validation command, the pictures and the benchmark use as their default model)
and the demo command. May import `dyt_export`, `runtimes` and the validation product
(`validation.harness` and what it uses); nothing of the benchmark.
"""
from .model import DemoModel, ensure_demo_model

__all__ = ["DemoModel", "ensure_demo_model"]

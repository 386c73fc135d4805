"""Validation harness: parity against PyTorch, accuracy, activation, FLOPs and throughput
of exported DyT models on each runtime (`python -m validation`), the demo
(`python -m validation.demo`) and the pictures (`python -m validation.pictures`).

Runners live in `runtimes/`; this package holds the comparator (`compare`), the timer
(`throughput`), inputs (`data`), records (`record`, schema in `record.schema.json`) and
the orchestration (`harness`).
"""

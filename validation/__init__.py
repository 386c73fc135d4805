"""Validation: does every runtime give PyTorch's answers, and how fast? (`python -m validation`,
`make validate`), with the pictures of what the dispatchers do (`python -m validation.pictures`).

The product at this package's top: the command (`cli`; the helpers every command shares
are `dyt_export.cli.common`'s), the orchestration (`harness`), the comparator (`compare`), records
(`record`, schema in `record.schema.json`), the timer (`throughput`), inputs (`data`), the
files a validation needs beside the model (`models`: twins), activation and MACs (`costs`),
the machine a record was measured on (`machine`) and the pictures (`pictures`); datasets at
any size: image folders read a chunk at a time (`dataset`), the chunked parity run and its
mergeable results (`stream`, with `accuracy`), shards saved for `--resume` and run here or on
Ray Data (`shards`, `on_ray`; Ray only when asked for). Two
subpackages build on it: the demo (`validation.demo`: the demo model, which the product
uses as its default model, and its command) and the benchmark (`validation.bench`, which
nothing in the product imports).

May import `dyt_export` (to read and export models, and for the PyTorch reference's
checkpoints) and `runtimes` (to run them); runners live in `runtimes/`, never here.
"""

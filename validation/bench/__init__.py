"""The benchmarks: does the token dispatch pay on ViT-B/16 (`make bench`,
`python -m validation.bench`), what does serving cost (`make loadtest`,
`python -m validation.bench.loadtest`), and how fast does dataset validation run,
sequential and on Ray workers (`make scale`, `python -m validation.bench.scale`)? Also
`make gpu-check` (`python -m validation.bench.gpu_check`), which validates the benchmark's
model on ORT-CUDA.

Owns the benchmark's models (`models`), its timer of several contenders in turns (`turns`:
paired ratios; a validation record's own img/s is `validation.throughput`'s), the int8 and
peak-memory measurements (`int8`, `memory`), the eager PyTorch baseline (`public_eager`),
the machine's GEMM rate (`gemm`), the report and docs section (`report`), the load test
(`loadtest`) and the dataset-validation rate (`scale`). May import `dyt_export`, `runtimes`
and the validation product (timer, comparator, harness, demo); nothing in the product
imports it. Ships in the wheel as part
of `validation`, so `python -m validation.bench` runs from an installed toolkit.
"""

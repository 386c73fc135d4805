"""The benchmark (`make bench`, `python -m validation.bench`): does the token dispatch pay on
ViT-B/16? Also `make gpu-check` (`python -m validation.bench.gpu_check`), which validates the
benchmark's model on ORT-CUDA, and `make scale` (`python -m validation.bench.scale`): how fast
dataset validation runs, sequential and on Ray workers.

Owns the benchmark's models (`models`), the int8 and peak-memory measurements (`int8`,
`memory`), the eager PyTorch baseline (`public_eager`), the machine's GEMM rate (`gemm`) and
the report and docs section (`report`). May import `dyt_export`, `runtimes` and the
validation product (timer, comparator, harness, demo); nothing in the product imports it.
"""

"""`make loadtest` (`python -m validation.bench.loadtest`): the serving benchmark
(docs/serving.md). It builds its models with the validation product's and the benchmark's
tools and loads a real server (`runtimes.serving`) with closed-loop clients on this machine.
May import `dyt_export`, `runtimes`, `validation` and `validation.bench`; nothing imports it."""

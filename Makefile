# Every target that runs Python first makes sure .venv exists and holds the project.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.dyt-installed

RUNTIME ?= ort-cpu
MODEL   ?=
REF     ?=
OUT     ?=
CKPT    ?=
ARGS    ?=

.PHONY: setup test demo serve export validate pictures bench scale loadtest cpp setup-cuda gpu-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test,serve,data]'
	@touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q -n 2 --durations=15 tests

demo: setup
	$(BIN)/python -m validation.demo $(ARGS)

# Serve MODEL (default: the demo model `make demo` made) on RUNTIME over HTTP, on a local Ray
# instance: the Open Inference Protocol and an image route (docs/serving.md); Ctrl-C stops.
DEMO_ONNX := $(or $(DYT_CACHE_DIR),.cache)/demo/dyt_digits.onnx
serve: setup
	@test -n "$(MODEL)" -o -f "$(DEMO_ONNX)" || { echo "no demo model in $(DEMO_ONNX): run make demo first, or pass MODEL=model.onnx"; exit 2; }
	$(BIN)/dyt-export serve $(or $(MODEL),$(DEMO_ONNX)) --runtime $(RUNTIME) $(ARGS)

export: setup
	@test -n "$(CKPT)" || { echo "usage: make export CKPT=model.pt [ARGS='--opset 18 --with-masks']"; exit 2; }
	$(BIN)/dyt-export $(CKPT) $(ARGS)

# Parity, accuracy and throughput of MODEL (default: the demo model) on RUNTIME against the
# PyTorch reference (REF, default: the checkpoint recorded in MODEL); record in OUT.
validate: setup
	$(BIN)/python -m validation --runtime $(RUNTIME) $(if $(MODEL),--model $(MODEL)) $(if $(REF),--ref $(REF)) $(if $(OUT),--out $(OUT)) $(ARGS)

# Does the token dispatch pay? ViT-B/16 DyT at activation 0.3/0.5/0.7 vs its dense and masked
# exports, eager PyTorch, DyT + ToMe (issue 23) and the machine's GEMM rate, on ORT-CPU and OpenVINO
# (issue 5). 31 minutes on 2 quiet cores before the ToMe rows (not timed whole since; ARGS='--only
# tome --min-calls 6' took 21) and 6 GB of disk; writes validation/records/bench/bench.json and the
# tables in docs/performance.md. Run it alone: on shared cores, flock -x /tmp/dyt-bench.lock make bench
bench: setup
	DYT_BENCH_FROM_MAKE=1 $(BIN)/python -m validation.bench $(ARGS)

# Dataset validation speed (docs/validation.md): images/s of the parity run on a labeled digits
# folder, sequential vs Ray Data with 1 and 2 one-thread workers, for the demo model and ViT-B/16;
# writes validation/records/scale/scale.json. About 5 minutes. Run it alone: flock -x /tmp/dyt-bench.lock make scale
scale: setup
	$(BIN)/python -m validation.bench.scale $(ARGS)

# Served throughput and latency (docs/serving.md): the demo model and ViT-B/16 DyT at activation
# 0.5 behind `dyt-export serve`'s deployment on ORT-CPU and OpenVINO, closed-loop clients at 1, 8
# and 32 on localhost, beside the in-process backend; writes validation/records/loadtest/.
# About 45 minutes on 2 quiet cores. Run it alone: flock -x /tmp/dyt-bench.lock make loadtest
loadtest: setup
	$(BIN)/python -m validation.bench.loadtest $(ARGS)

# Activation-rate chart and token overlays of MODEL (default: the demo model, as the README
# shows it: docs/img/demo-digits-*.png) into docs/img.
pictures: setup
	$(BIN)/python -m validation.pictures $(if $(MODEL),$(MODEL),--prefix demo-digits) $(ARGS)

# ONNX Runtime with CUDA for RUNTIME=ort-cuda: puts onnxruntime-gpu, built for the CUDA major
# version of the pinned torch (CUDA 13), in place of the onnxruntime wheel (both install the
# same module). Idempotent; rerun after `make setup` reinstalls onnxruntime. Ends with the
# availability check (exit 2 without a usable GPU). Undo: .venv/bin/python -m runtimes.cuda_setup --undo
# See docs/gpu.md.
setup-cuda: setup
	$(BIN)/python -m runtimes.cuda_setup
	$(BIN)/python -m runtimes ort-cuda

# ORT-CUDA end to end on an NVIDIA GPU, unattended, within 8 minutes: setup-cuda, the demo
# (fp32, fp16) and ViT-B/16 DyT validated on ort-cuda, DyT vs dense img/s beside the paper's
# GPU figures. Exits 2 at once, installing nothing, where there is no GPU (docs/gpu.md).
gpu-check: setup
	$(BIN)/python -m validation.bench.gpu_check $(ARGS)

# C++ library dyt::model and dyt_infer (runtimes/cpp): ONNX Runtime and OpenVINO libraries
# from the wheels in .venv, ONNX Runtime headers fetched once into the build tree.
# Extra CMake flags: make cpp CPP_ARGS='-DONNXRUNTIME_ROOT=/opt/onnxruntime'
CPP_ARGS ?=
cpp: setup
	cmake -S runtimes/cpp -B runtimes/cpp/build -DCMAKE_BUILD_TYPE=Release -DDYT_PYTHON=$(abspath $(BIN)/python) $(CPP_ARGS)
	cmake --build runtimes/cpp/build --parallel 2

clean:
	rm -rf build dist *.egg-info .pytest_cache

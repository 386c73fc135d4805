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

.PHONY: setup test demo export validate bench cpp setup-cuda clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	@touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q -n 2 --durations=15 tests

demo: setup
	$(BIN)/python -m validation.demo $(ARGS)

export: setup
	@test -n "$(CKPT)" || { echo "usage: make export CKPT=model.pt [ARGS='--opset 18 --with-masks']"; exit 2; }
	$(BIN)/dyt-export $(CKPT) $(ARGS)

# C++ library dyt::model and dyt_infer (runtimes/cpp): ONNX Runtime and OpenVINO libraries
# from the wheels in .venv, ONNX Runtime headers fetched once into the build tree.
# Extra CMake flags: make cpp CPP_ARGS='-DONNXRUNTIME_ROOT=/opt/onnxruntime'
CPP_ARGS ?=
cpp: setup
	cmake -S runtimes/cpp -B runtimes/cpp/build -DCMAKE_BUILD_TYPE=Release -DDYT_PYTHON=$(abspath $(BIN)/python) $(CPP_ARGS)
	cmake --build runtimes/cpp/build --parallel 2

clean:
	rm -rf build dist *.egg-info .pytest_cache

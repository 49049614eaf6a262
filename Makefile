# The two commands of the README:
#   make demo   set up .venv and run the default pipeline on the embedded corpus (ends with the report's
#               headline and the teacher and the headline student continuing one prompt)
#   make test   set up .venv and run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
RUNS   ?= runs

.PHONY: demo web-demo test test-slow test-browser clean

# torch is pinned first so pip takes the CPU build where one is offered locally; the
# project's own range (torch>=2.4) then installs nothing more.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# The default pipeline: corpus -> teacher -> students -> int8/int4 -> ONNX -> report (~30 min on
# 2 CPU cores the first time; a rerun skips every finished stage). It ends with the report's
# headline, then the report's baseline (the teacher) and headline student continuing one prompt,
# sampled: a small model decoding greedily soon repeats one line, the repetition penalty keeps
# it moving.
DEMO_PROMPT   ?= def read_config(path):
DEMO_SAMPLING ?= --max-new-tokens 60 --temperature 0.7 --top-p 0.9 --repetition-penalty 1.2

demo: $(STAMP)
	$(BIN)/compactgpt pipeline --out $(RUNS)/pipeline
	@$(BIN)/compactgpt info $(RUNS)/pipeline/report
	@$(BIN)/compactgpt generate --model $(RUNS)/pipeline/report --prompt "$(DEMO_PROMPT)" $(DEMO_SAMPLING)

test: $(STAMP)
	$(BIN)/python -m pytest

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

# The demo's headline int4 student in the browser: builds the web bundle (fetching onnxruntime-web
# from npm once; needs node and npm) and serves it on http://127.0.0.1:8000/ (Ctrl-C stops).
web-demo: $(STAMP)
	$(BIN)/compactgpt deploy --model $(RUNS)/pipeline/onnx/student-l2-mlp512-int4 --target web --out $(RUNS)/web --overwrite
	$(BIN)/python -m compactgpt.app.deploy.serve $(RUNS)/web

# Browser and Node tests (headless Chromium: apt-get install chromium). The JavaScript libraries
# are installed here, before the tests, which install nothing themselves.
test-browser: $(STAMP)
	$(BIN)/python -m compactgpt.app.deploy.jslibs
	$(BIN)/python -m pytest -m browser

clean:
	rm -rf $(VENV) $(RUNS)

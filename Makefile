# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv (if
# missing) and installs what it needs; nothing has to be installed by hand.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch that CI installs; on a CUDA machine use e.g.
# `make install TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.vmae-ray-installed
PYTEST_ARGS ?=

.PHONY: install demo test lint browser ffmpeg bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m vmae_ray.demo --workdir demo_out

test: lint browser ffmpeg
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The report's browser test renders the page in Debian's chromium: install it when it is missing
# and apt-get is there (as root, or with password-less sudo). Never fails: where it cannot be
# installed, the test is skipped and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1; then \
	    if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO="sudo -n"; fi; \
	    echo "installing chromium (Debian package) for the browser test"; \
	    $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 \
	    || { $$SUDO apt-get update -q >/dev/null 2>&1 \
	         && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1; } \
	    || echo "note: could not install chromium; the browser test will be skipped"; \
	  else echo "note: chromium not found and no apt-get; the browser test will be skipped"; fi; }

# The video-kind tests make their media with ffmpeg's command line (and read right values with
# ffprobe): install Debian's ffmpeg the same way. Never fails: without it those tests are skipped
# and say why.
ffmpeg:
	@command -v ffmpeg >/dev/null 2>&1 && command -v ffprobe >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1; then \
	    if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO="sudo -n"; fi; \
	    echo "installing ffmpeg (Debian package) for the video-kind tests"; \
	    $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends ffmpeg >/dev/null 2>&1 \
	    || { $$SUDO apt-get update -q >/dev/null 2>&1 \
	         && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends ffmpeg >/dev/null 2>&1; } \
	    || echo "note: could not install ffmpeg; the video-kind tests will be skipped"; \
	  else echo "note: ffmpeg not found and no apt-get; the video-kind tests will be skipped"; fi; }

lint: $(STAMP)
	$(BIN)/python -m ruff check vmae_ray tests bench jobs

bench: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[test,bench]'
	$(BIN)/python -m bench.run --workdir bench_out --results BENCHMARKS.md

clean:
	rm -rf demo_out bench_out .pytest_cache

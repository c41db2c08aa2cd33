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

# Install a Debian package with apt-get when its commands are missing (as root, or with
# password-less sudo): $(call apt_install,PACKAGE,WHAT NEEDS IT). Never fails: where it cannot be
# installed, the tests that need it are skipped and say why.
define apt_install
{ if command -v apt-get >/dev/null 2>&1; then \
    if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO="sudo -n"; fi; \
    echo "installing $(1) (Debian package) for $(2)"; \
    $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(1) >/dev/null 2>&1 \
    || { $$SUDO apt-get update -q >/dev/null 2>&1 \
         && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(1) >/dev/null 2>&1; } \
    || echo "note: could not install $(1); $(2) will be skipped"; \
  else echo "note: $(1) not found and no apt-get; $(2) will be skipped"; fi; }
endef

# The report's browser test renders the page in Debian's chromium.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  $(call apt_install,chromium,the browser test)

# The video-kind tests make their media with ffmpeg's command line (and read right values with
# ffprobe).
ffmpeg:
	@command -v ffmpeg >/dev/null 2>&1 && command -v ffprobe >/dev/null 2>&1 || \
	  $(call apt_install,ffmpeg,the video-kind tests)

lint: $(STAMP)
	$(BIN)/python -m ruff check vmae_ray tests bench jobs

bench: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[test,bench]'
	$(BIN)/python -m bench.run --workdir bench_out --results BENCHMARKS.md

clean:
	rm -rf demo_out bench_out .pytest_cache

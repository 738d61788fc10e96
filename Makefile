# capwatch: one command to run, one to test. Both set the host up first
# (deploy/host-setup.sh: Debian packages, kernel headers, tracefs, venv);
# the set-up is idempotent and takes a second once done.
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup trace serve test test-unit test-kernels lint bench soak clean

setup:
	@bash deploy/host-setup.sh --venv $(VENV)

# Watch capability denials live (add ARGS="--all", "--unique", "--json" ...).
trace: setup
	@$(VENV)/bin/capwatch trace $(ARGS)

serve: setup
	@$(VENV)/bin/capwatch serve $(ARGS)

# The whole suite: unit tests, real BPF, real containers, a real Prometheus.
test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

# Only the VM matrix: Debian's 6.1 and 6.12 kernels booted in QEMU, capwatch's
# fexit and kprobe modes run inside (tests/vm; kernels cached in
# /var/lib/capwatch-kernels). Part of `make test` too.
test-kernels: setup
	$(PY) -m pytest tests/vm -m vm $(PYTEST_ARGS)

# Only what runs anywhere (no root, no kernel).
test-unit: setup
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check capwatch tests bench
	$(VENV)/bin/mypy
	clang-format --dry-run -Werror bpf/*.c bpf/*.h

bench: setup
	$(PY) -m bench.bench_overhead $(ARGS)

soak: setup
	$(PY) -m bench.soak $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis

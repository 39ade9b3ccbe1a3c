# Entry points (see README): `make demo`, `make test`, `make evidence`, `make ablation`. All create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
FASHION_MNIST := /usr/share/datasets/fashion-mnist

.PHONY: setup data demo evidence ablation test

setup: $(VENV)/.installed data

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

# Real offline data for the metric tests and the Fashion-MNIST testbed (Debian package, MIT licensed).
# Elsewhere: set DISA_FASHION_MNIST_DIR to a folder holding Zalando's four IDX files.
data:
	@if [ -n "$$DISA_FASHION_MNIST_DIR" ] || [ -d "$(FASHION_MNIST)" ]; then :; \
	elif command -v apt-get >/dev/null; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	else echo "make: Fashion-MNIST not found; set DISA_FASHION_MNIST_DIR (see README)" >&2; exit 1; fi

demo: setup
	$(PY) scripts/demo.py $(ARGS)

# The paper's three observations and the step/strategy ablation, on the shipped Fashion-MNIST MAR (README).
evidence: setup
	$(PY) scripts/fmnist_evidence.py $(ARGS)

ablation: setup
	$(PY) scripts/fmnist_ablation.py $(ARGS)

# pytest exits 5 when it collects nothing: that must fail loudly, not pass as "no failures".
test: setup
	@$(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests (exit 5); treating as a failure" >&2; fi; \
	exit $$rc

# alertd — developer entry points. Everything installs into ./.venv.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test bench clean install-systemd

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

demo: install
	$(PY) bench/demo.py

test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Bench-only extras (matplotlib) go into the same venv; nginx and wrk come from apt.
BENCH_STAMP := $(VENV)/.bench-installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

$(BENCH_STAMP): bench/requirements.txt $(STAMP)
	$(PY) -m pip install --quiet -r bench/requirements.txt
	touch $(BENCH_STAMP)

bench: install $(BENCH_STAMP)
	@if ! command -v wrk >/dev/null || ! { command -v nginx >/dev/null || [ -x /usr/sbin/nginx ]; }; then \
	  echo "bench: installing nginx-light and wrk with apt-get (system nginx config untouched; the bench runs its own)"; \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light wrk >/dev/null; \
	fi
	$(PY) -m bench.run $(BENCH_ARGS)

clean:
	rm -rf var .pytest_cache .benchmarks bench/results

# Production install (as root; never run by the tests): the package into its own
# venv under $(PREFIX), a system user, the unit, the example config (kept if present).
PREFIX     ?= /opt/alertd
UNIT_DIR   ?= /etc/systemd/system
CONF_DIR   ?= /etc/alertd
STATE_DIR  ?= /var/lib/alertd

install-systemd:
	install -d $(PREFIX)/src
	cp -r daemon mock_webhook pyproject.toml requirements.txt README.md $(PREFIX)/src/
	$(PYTHON) -m venv $(PREFIX)/.venv
	sed "/^# tests/,$$$$d" requirements.txt > $(PREFIX)/src/requirements-run.txt
	$(PREFIX)/.venv/bin/pip install --quiet -r $(PREFIX)/src/requirements-run.txt
	$(PREFIX)/.venv/bin/pip install --quiet --no-deps $(PREFIX)/src
	getent group alertd >/dev/null || groupadd --system alertd
	getent passwd alertd >/dev/null || useradd --system --gid alertd --home-dir $(STATE_DIR) \
		--no-create-home --shell /usr/sbin/nologin alertd
	install -d -m 0750 -o alertd -g alertd $(STATE_DIR)
	install -d -m 2770 -o alertd -g alertd $(STATE_DIR)/inbox
	install -d -m 0750 -o root -g alertd $(CONF_DIR)
	test -e $(CONF_DIR)/alertd.toml || install -m 0640 -o root -g alertd systemd/alertd.toml $(CONF_DIR)/alertd.toml
	sed 's#/opt/alertd#$(PREFIX)#g' systemd/alertd.service > $(UNIT_DIR)/alertd.service
	chmod 0644 $(UNIT_DIR)/alertd.service
	if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
	@echo "installed: edit $(CONF_DIR)/alertd.toml, then: systemctl enable --now alertd"

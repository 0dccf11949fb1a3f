# alertd — developer entry points. Everything installs into ./.venv.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-pure bench clean install-systemd test-systemd

ROWPATH_STAMP := $(VENV)/.rowpath-built
ROWPATH_SRC := daemon/rowpath/_fast.pyx $(wildcard daemon/rowpath/*.pxi)

MOCK_HOT_STAMP := $(VENV)/.mock-hot-built

install: $(STAMP) $(ROWPATH_STAMP) $(MOCK_HOT_STAMP)

# --no-build-isolation: setup.py compiles the row path with the venv's pinned Cython.
$(STAMP): requirements.txt pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

# The compiled row path, rebuilt in place (daemon/rowpath/_fast.*.so) when its source changes.
$(ROWPATH_STAMP): $(ROWPATH_SRC) setup.py $(STAMP)
	@# Its C headers: OpenSSL (HMAC-SHA256), zlib (CRC32) and Python's, from apt when missing.
	@[ -f /usr/include/openssl/sha.h ] && [ -f /usr/include/zlib.h ] && \
	  $(PY) -c "import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()['include'], 'Python.h')))" || { \
	  echo "install: installing libssl-dev, zlib1g-dev and python3-dev with apt-get (the compiled row path)"; \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libssl-dev zlib1g-dev python3-dev >/dev/null; }
	$(PY) setup.py --quiet build_ext --inplace
	$(PY) -c "import alertd.rowpath as r; assert r.IMPL == 'compiled', 'row path not compiled'"
	touch $(ROWPATH_STAMP)

# The mock webhook's compiled hot path (a test tool, not part of the alertd package: built in
# place, its libraries named in the .pyx). Needs OpenSSL's headers, installed just above.
$(MOCK_HOT_STAMP): mock_webhook/_hot.pyx $(ROWPATH_STAMP)
	$(VENV)/bin/cythonize -i -q mock_webhook/_hot.pyx
	$(PY) -c "import mock_webhook._hot"
	touch $(MOCK_HOT_STAMP)

demo: install
	$(PY) bench/demo.py

# Two tests at a time: most of them wait on real processes and sockets, and the suite takes
# half as long; timing-sensitive checks compare counts, not seconds, so they hold under it.
PYTEST_JOBS ?= 2

# The cluster tests start their own redis-server (own port, own dir); the package's
# service, where apt starts one, is never used.
test: install
	@command -v redis-server >/dev/null || [ -x /usr/bin/redis-server ] || { \
	  echo "test: installing redis-server with apt-get (for the cluster tests)"; \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; }
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -n $(PYTEST_JOBS) --dist loadgroup $(PYTEST_ARGS)

# The core end-to-end tests again on the pure-Python row path (the reference; `make test`
# runs the compiled one): the same behaviour from both, as CI checks after `make test`.
PURE_TESTS ?= tests/test_e2e.py tests/test_failures.py
test-pure: install
	ALERTD_PURE_PYTHON=1 $(PY) -m pytest -q -n $(PYTEST_JOBS) --dist loadgroup $(PURE_TESTS)

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
	@command -v redis-server >/dev/null || [ -x /usr/bin/redis-server ] || { \
	  echo "bench: installing redis-server with apt-get (cluster mode vs single host)"; \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; }
	$(PY) -m bench.cluster

clean:
	rm -rf var .pytest_cache .benchmarks bench/results

# Production install (as root; never run by `make test`): the package into its own venv
# under $(PREFIX), the service user and groups, the unit, the example config (kept if
# present). mock_webhook is a test tool and stays in the checkout. PIP_OPTS passes pip
# options, e.g. "--no-index --find-links DIR" for an offline wheelhouse (make test-systemd).
PREFIX     ?= /opt/alertd
UNIT_DIR   ?= /etc/systemd/system
CONF_DIR   ?= /etc/alertd
STATE_DIR  ?= /var/lib/alertd
PRODUCERS  ?= alertd-producers
PIP_OPTS   ?=

install-systemd:
	install -d $(PREFIX)/src
	rm -rf $(PREFIX)/src/daemon $(PREFIX)/src/mock_webhook $(PREFIX)/src/build
	cp -r daemon pyproject.toml requirements.txt README.md $(PREFIX)/src/
	$(PYTHON) -m venv $(PREFIX)/.venv
	@# Runtime pins only: everything from the "# tests" line on is for the checkout.
	sed '/^# tests/,$$d' requirements.txt > $(PREFIX)/src/requirements-run.txt
	$(PREFIX)/.venv/bin/pip install --quiet $(PIP_OPTS) -r $(PREFIX)/src/requirements-run.txt
	$(PREFIX)/.venv/bin/pip install --quiet $(PIP_OPTS) --no-deps $(PREFIX)/src
	getent group alertd >/dev/null || groupadd --system alertd
	getent group $(PRODUCERS) >/dev/null || groupadd --system $(PRODUCERS)
	getent passwd alertd >/dev/null || useradd --system --gid alertd --home-dir $(STATE_DIR) \
		--no-create-home --shell /usr/sbin/nologin alertd
	@# 0751: producers pass through to the inbox; 3770: setgid (files are the producers'
	@# group, which the service reads through) + sticky (only a file's owner, or alertd as
	@# the directory's owner, may rename or delete it).
	install -d -m 0751 -o alertd -g alertd $(STATE_DIR)
	install -d -m 3770 -o alertd -g $(PRODUCERS) $(STATE_DIR)/inbox
	install -d -m 0750 -o root -g alertd $(CONF_DIR)
	test -e $(CONF_DIR)/alertd.toml || install -m 0640 -o root -g alertd systemd/alertd.toml $(CONF_DIR)/alertd.toml
	sed 's#/opt/alertd#$(PREFIX)#g' systemd/alertd.service > $(UNIT_DIR)/alertd.service
	chmod 0644 $(UNIT_DIR)/alertd.service
	if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
	@echo "installed: edit $(CONF_DIR)/alertd.toml, then: systemctl enable --now alertd"
	@echo "producers: usermod -aG $(PRODUCERS) USER (never the alertd group: it reads the secrets)"

# Boot test (as root): systemd as PID 1 in a systemd-nspawn container over a cached
# Debian bookworm tree (var/nspawn), `make install-systemd` inside, then start, deliver,
# reload, crash, watchdog and stop checks. Prints one PASS/FAIL line per check.
test-systemd:
	bash tests/systemd/boot-test.sh

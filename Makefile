# Every target sets up .venv first (created from the system interpreter so that sliver and
# delegate accounts can execute it too; see README "Install on a node").
PYTHON_SYS ?= $(shell test -x /usr/bin/python3 && echo /usr/bin/python3 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-deps bench crash fuzz venv deb clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || scripts/need-venv $(PYTHON_SYS)
	test -x $(PY) || $(PYTHON_SYS) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m nodemanager.demo

# As root on Debian/Ubuntu, first installs the system packages the tests use (sshd, nft, ...);
# elsewhere it says which are missing and those tests skip with the reason.
test: test-deps $(STAMP)
	$(PY) -m pytest -q

test-deps:
	@scripts/install-test-deps

# The Debian package, dist/nodemanager_<version>-1_<arch>.deb: the program in a virtualenv under
# /usr/lib/nodemanager made from /usr/bin/python3, the unit, logrotate, the sshd drop-in and the
# example configuration (README "Debian package"). Downloads the pinned wheels once (build/deb/wheels).
deb: $(STAMP)
	scripts/build-deb --python $(PY)

bench: $(STAMP)
	$(PY) bench/run.py

# The crash simulation also runs in `make test` (every crash point of small scenarios); this is the
# long profile: larger scenarios, several seeds, thousands of crash points (a few minutes).
crash: $(STAMP)
	$(PY) -m pytest -q -s tests/crash -p no:cacheprovider --crash-profile=long

# The fuzz targets also run in `make test` with the short "ci" profile (seconds); this is the
# long run: thousands of examples per target (a few minutes).
fuzz: $(STAMP)
	$(PY) -m pytest -q tests/fuzz -p no:cacheprovider --hypothesis-profile=long

clean:
	rm -rf $(VENV) build dist .pytest_cache .hypothesis

# Two commands for a newcomer: `make demo` runs the pipeline, `make test` runs the tests.
# Both install what they need (Debian packages, FerretDB, a virtualenv) and start the services.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-cluster bench bench-cluster soak screenshot browser services services-down venv clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

venv: $(VENV)/.installed

services:
	scripts/services up

# Debian's Chromium and its WebDriver, for tests/test_dashboard.py and `make screenshot`.
browser:
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; }

services-down:
	scripts/services down

# For docker compose: .env.example with a password of its own in each empty *_PASSWORD=, mode 600,
# and the local CA and certificate that its services show (.data/tls).
.env:
	umask 077; $(PYTHON) -c 'import re, secrets, sys; sys.stdout.write(re.sub(r"(?m)^(\w+_PASSWORD)=$$", \
	  lambda m: m[1] + "=" + secrets.token_urlsafe(24), open(".env.example").read()))' > $@
	scripts/services tls

demo: venv services
	scripts/demo

# The suite, then again what TLS and the users concern with the plain-text listeners off.
test: venv services browser
	$(PY) -m pyflakes *.py tests/*.py $(wildcard bench/*.py scripts/*.py rabbitmq/*.py)
	$(PY) -m pytest
	REQUIRE_TLS=1 scripts/services up
	REQUIRE_TLS=1 $(PY) -m pytest tests/test_tls.py tests/test_access.py tests/test_pipeline.py; \
	  status=$$?; scripts/services up; exit $$status

# The fault tests of tests/test_cluster.py on the three local nodes of `scripts/services cluster`,
# which are stopped afterwards (a partition test makes a cluster of its own in network namespaces).
test-cluster: venv services
	scripts/services cluster up
	$(PY) -m pytest -m cluster; status=$$?; scripts/services cluster down; exit $$status

# The ingest benchmark's Telegraf column builds Telegraf once (scripts/telegraf-build, minutes).
bench: venv services
	$(PY) bench/ingest.py --telegraf
	$(PY) bench/query.py
	$(PY) bench/live.py
	$(PY) bench/fold.py

# On the three local nodes of `scripts/services cluster`: server.py's drain rate against one node's,
# and the time from kill -9 of the queue leader's node until messages are stored again.
bench-cluster: venv services
	scripts/services cluster up
	$(PY) bench/cluster.py

# 30 minutes of ingest at 1,000 msg/s, queries and a kill -9 of a server process every 3 minutes.
soak: venv services
	$(PY) bench/soak.py

# docs/dashboard.png, the README's picture of the dashboard, over an hour of demo messages.
screenshot: venv services browser
	$(PY) scripts/screenshot.py

clean:
	scripts/services reset
	rm -rf $(VENV)

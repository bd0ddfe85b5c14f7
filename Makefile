# The two commands of the README: `make run` and `make test`. Everything they need is
# installed here, so a fresh machine (and CI) needs nothing by hand.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
SSLYZE  := .venv-sslyze/bin/sslyze


.PHONY: run test install install-test test-deps lint typecheck bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q -e .

install-test: $(BIN)/python test-deps $(SSLYZE)
	$(BIN)/pip install -q -e '.[test]'

# sslyze checks our TLS listeners against Mozilla's profile in the tests. It pins an older
# cryptography than smarthost runs on, so it lives in a venv of its own.
$(SSLYZE):
	$(PY) -m venv .venv-sslyze
	.venv-sslyze/bin/pip install -q sslyze

# Real third-party clients and peers for the end-to-end tests (Debian packages). Postfix is
# installed with "No configuration": the tests run private instances of it, as does bench/.
TEST_PACKAGES := swaks msmtp apache2-utils fail2ban chromium slapd ldap-utils krb5-kdc \
	krb5-admin-server krb5-user libkrb5-dev postfix redis-server haproxy
test-deps:
	@if ! command -v swaks >/dev/null || ! command -v msmtp >/dev/null || ! command -v htpasswd >/dev/null || ! command -v fail2ban-regex >/dev/null || ! command -v chromium >/dev/null || ! [ -x /usr/sbin/slapd ] || ! [ -x /usr/sbin/krb5kdc ] || ! command -v krb5-config >/dev/null || ! [ -x /usr/sbin/postfix ] || ! command -v redis-server >/dev/null || ! command -v haproxy >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(TEST_PACKAGES) >/dev/null; \
	  else \
	    echo "needed: sudo apt-get install $(TEST_PACKAGES)" >&2; exit 1; \
	  fi; \
	fi

run: install
	$(BIN)/twistd -n smarthost

lint:
	$(BIN)/ruff check --no-cache smarthost tests twisted scripts bench
	$(BIN)/mypy
	$(BIN)/mypy --allow-untyped-calls tests
	$(BIN)/lint-imports

test: install-test
	$(BIN)/ruff check --no-cache smarthost tests twisted scripts bench
	$(BIN)/mypy
	$(BIN)/mypy --allow-untyped-calls tests
	$(BIN)/lint-imports
	SSLYZE=$(SSLYZE) $(BIN)/python -m pytest -q -p no:cacheprovider

# The benchmark against Postfix (installs Postfix from Debian; needs root). Not run by CI.
bench: install
	bench/run

clean:
	rm -rf $(VENV) .venv-sslyze var build *.egg-info

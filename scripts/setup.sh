#!/usr/bin/env bash
# make setup: the servers the tests and `make run` need (Debian packages, installed
# only when missing) and a virtualenv in .venv with every distribution editable and the
# third-party packages at the versions and hashes of constraints.txt.
# Idempotent; meant for Debian 12 as root (or with sudo).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ]; }
have_pg() { have initdb || compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; }

missing=()
have redis-server || missing+=(redis-server)
have_pg || missing+=(postgresql)
# dnsmasq-base: the binary only; the dnsmasq package would start a DNS service on port 53.
have dnsmasq || missing+=(dnsmasq-base)
# postfix brings smtp-source and smtp-sink (benchmark) and the Postfix we compare with.
have smtp-sink || missing+=(postfix)
have swaks || missing+=(swaks)
# rspamd: the real spam checker of the rspamd plugin's tests (they run their own on a free port).
have rspamd || missing+=(rspamd)
# DANE tests: NSD serves zones that ldns-signzone (ldnsutils) signs, unbound validates them
# (each test module runs its own on free ports).
have nsd || missing+=(nsd)
have unbound || missing+=(unbound)
have ldns-signzone || missing+=(ldnsutils)
# The web console's browser tests: headless Chromium driven through chromedriver by selenium
# (Debian's builds, so selenium downloads no browser of its own).
have chromium || missing+=(chromium)
have chromedriver || missing+=(chromium-driver)
# Mail::DKIM: the second, independent verifier in the DKIM signer tests.
perl -MMail::DKIM::Verifier -e1 >/dev/null 2>&1 || missing+=(libmail-dkim-perl)
"$PYTHON" -m venv --help >/dev/null 2>&1 && "$PYTHON" -c 'import ensurepip' 2>/dev/null || missing+=(python3-venv)

if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing Debian packages: ${missing[*]}"
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null || { echo "setup: need root or sudo to install ${missing[*]}" >&2; exit 1; }
        SUDO=sudo
    fi
    # Postfix asks questions on install; answer them: local delivery only, nothing listens on 25.
    echo "postfix postfix/main_mailer_type select Local only" | $SUDO debconf-set-selections
    echo "postfix postfix/mailname string localhost.localdomain" | $SUDO debconf-set-selections
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
    # The nsd and unbound packages come as system services on port 53, which the tests do not
    # want (they start their own): stopped and disabled where systemd runs them.
    if [ -d /run/systemd/system ]; then
        for unit in nsd unbound; do
            if [[ " ${missing[*]} " == *" $unit "* ]]; then
                $SUDO systemctl disable --now "$unit.service" >/dev/null 2>&1 || true
            fi
        done
    fi
else
    echo "setup: server packages already present"
fi

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
pip=("$VENV/bin/python" -m pip)
# Every third-party package (pip and setuptools too) from the lock, each file checked against its hash.
"${pip[@]}" install -q --require-hashes -r constraints.txt
# This repository's distributions, editable. pip checks no hashes for those, so: without their
# dependencies (the lock brought them) and built with the locked setuptools (no build isolation).
"${pip[@]}" install -q --no-deps --no-build-isolation \
    -e libs/common \
    -e services/ingest -e services/queue -e services/sender -e services/bounce -e services/api \
    -e tools/devtools -e tools/cli
# The lock must meet every range: a pyproject.toml or requirements-dev.txt changed without `make lock`
# stops here. (--no-index: whatever the lock lacks is not fetched.)
if ! "${pip[@]}" check >/dev/null || ! "${pip[@]}" install -q --no-index --no-deps -r requirements-dev.txt 2>/dev/null; then
    "${pip[@]}" check >&2 || true
    echo "setup: constraints.txt does not meet the version ranges: run make lock" >&2
    exit 1
fi
echo "setup: done ($("$VENV/bin/python" --version), venv in $VENV)"

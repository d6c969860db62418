#!/usr/bin/env bash
# The Debian packages the tests and benchmarks start as real programs of their own:
# PgBouncer, Redis Sentinel, Chromium for the dashboard's browser test, and Prometheus
# (with promtool) for deploy/prometheus.yml's checks and scrape test. Installed
# when missing and this runs as root with apt-get; otherwise it names what to install,
# and the tests that need a missing one fail saying so.
set -euo pipefail

missing=()
command -v pgbouncer >/dev/null || [ -x /usr/sbin/pgbouncer ] || missing+=(pgbouncer)
command -v redis-sentinel >/dev/null || missing+=(redis-sentinel)
[ -x /usr/bin/chromium ] || missing+=(chromium)
command -v promtool >/dev/null || missing+=(prometheus)
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
  echo "installing Debian packages: ${missing[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
else
  echo "missing Debian packages: ${missing[*]} (as root: apt-get install -y ${missing[*]});" \
    "the tests that start them will fail until they are installed" >&2
fi

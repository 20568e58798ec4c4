#!/usr/bin/env bash
# Checks the Prometheus configuration and alert rules with promtool.
# Needs promtool on PATH (Debian: apt-get install prometheus); installs nothing itself.
# promtool resolves rule_files relative to config/prometheus.yml, so alerts.yml is checked twice:
# once as loaded by the config, once on its own.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v promtool >/dev/null 2>&1; then
    echo "promtool not found (Debian package: prometheus)" >&2
    exit 2
fi

promtool check config config/prometheus.yml
promtool check rules config/alerts.yml
if [ -f config/alerts.test.yml ]; then
    promtool test rules config/alerts.test.yml
fi

#!/usr/bin/env bash
# Restart latency of procagent (child and pid-file daemon) and of supervisord (child), in one
# run on this machine. Installs supervisor with pip when missing. Usage: bench/restart_latency.sh [KILLS]
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v supervisord >/dev/null; then
  python3 -m pip install --quiet supervisor
fi
KILLS=${1:-40} cargo bench --bench restart_latency

#!/usr/bin/env bash
# Start-all of N config-declared processes with containment off and on (root, cgroup v2
# writable), in one run. Usage: bench/start_all.sh [N] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
START_N=${1:-1000} ROUNDS=${2:-3} cargo bench --bench start_all

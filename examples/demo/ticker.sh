#!/bin/sh
# A tiny self-daemonizing demo service: forks into the background, writes its pid file, and
# prints a line every few seconds. Used by examples/quickstart.toml.
# Usage: ticker.sh PIDFILE [INTERVAL]
pidfile=${1:?pid file}
interval=${2:-5}
(
  trap 'echo "ticker: stopping"; kill $nap 2>/dev/null; exit 0' TERM INT
  while :; do
    echo "ticker: tick $(date +%T)"
    sleep "$interval" &
    nap=$!
    wait $nap
  done
) </dev/null &
echo $! > "$pidfile"
echo "ticker: started pid $!"

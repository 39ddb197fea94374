#!/usr/bin/env bash
# The cost of output capture (issue "Trust boundaries", item 8): the output keeper, one
# process per state directory, measured while procagentd manages N processes.
#
#   bash bench/output.sh                      # N=1000, 30 s windows
#   N=100 DURATION=10 bash bench/output.sh    # a quick look
#
# (a) N copies of sleep, each started in the foreground (`exec ./osleep`), so each holds its
#     own stdout and stderr pipes: the keeper then reads 2N pipes and the agent holds 2N
#     read-end duplicates. Idle for DURATION s: the keeper's CPU time (utime+stime), RSS
#     and descriptors; the agent's descriptors.
# (b) The same, plus one process writing to its stdout as fast as it can (a copy of yes):
#     the keeper's CPU over DURATION s, and the bytes it wrote (output files of that process
#     rotated at output_file_bytes; their sizes summed after each rotation is not possible,
#     so the input rate is measured instead: lines written, from the numbered output).
# (c) The keeper's RSS with no pipe at all: what one more relay process per managed process
#     (the svlogd design) would cost each.
# Every process started here is killed by pid at the end (trap EXIT).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=bench/lib.sh
. bench/lib.sh
ROOT=$(pwd)
N=${N:-1000}
DURATION=${DURATION:-30}
WORK=$(mktemp -d /tmp/pa-obench.XXXXXX)
chmod 755 "$WORK"
DPID=""

keeper_pid() {
  local p
  for p in /proc/[0-9]*; do
    if { tr '\0' ' ' < "$p/cmdline"; } 2>/dev/null | grep -q -- "--output-keeper $WORK/state/output"; then
      echo "${p#/proc/}"
      return 0
    fi
  done
  return 0
}

cleanup() {
  set +e
  [ -n "$DPID" ] && kill -TERM "$DPID" 2>/dev/null && sleep 1 && kill -KILL "$DPID" 2>/dev/null
  for e in "$WORK/osleep" "$WORK/oyes"; do
    p=$(pids_of_exe "$e"); [ -n "$p" ] && kill -KILL $p 2>/dev/null
  done
  k=$(keeper_pid); [ -n "$k" ] && kill -KILL "$k" 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT

# Proportional and private (dirty) memory, kB: "pss private_dirty".
private_kb() { awk '$1 == "Pss:" {p=$2} $1 == "Private_Dirty:" {d=$2} END {print p, d}' "/proc/$1/smaps_rollup"; }
TCK=$(getconf CLK_TCK)
cpu_ticks() { local st; st=$(cat "/proc/$1/stat"); st=${st##*) }; set -- $st; echo $(( ${12} + ${13} )); }

MACHINE="$(nproc) CPUs, $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo), Linux $(uname -r)"
log "machine: $MACHINE; N=$N DURATION=${DURATION}s; load: $(cut -d' ' -f1-3 /proc/loadavg)"
log "building (release)"
cargo build --release --bins >&2
cp "$(command -v sleep)" "$WORK/osleep"
cp "$(command -v yes)" "$WORK/oyes"
ulimit -n 20000 2>/dev/null || true
CLI=("$ROOT/target/release/procagent" --socket "$WORK/run/agent.sock")

bench_config "$WORK" "$N" osleep '[metrics]
sample_interval = "1h"

[store]
output_file_bytes = 8388608
output_files = 4' > "$WORK/agent.toml"

"$ROOT/target/release/procagentd" --config "$WORK/agent.toml" >"$WORK/daemon.log" 2>&1 &
DPID=$!
t0=$(date +%s.%N)
wait_running "$WORK/run/agent.sock" "$N" "$WORK/daemon.log"
log "all $N running after $(python3 -c "print(f'{$(date +%s.%N) - $t0:.1f}')") s; settling 5 s"
sleep 5
K=$(keeper_pid)
[ -n "$K" ] || { log "no keeper"; exit 1; }

# (a) idle
c0=$(cpu_ticks "$K"); a0=$(cpu_ticks "$DPID")
sleep "$DURATION"
c1=$(cpu_ticks "$K"); a1=$(cpu_ticks "$DPID")
A_CPU=$(python3 -c "print(f'{($c1 - $c0) / $TCK:.2f}')")
A_AGENT_CPU=$(python3 -c "print(f'{($a1 - $a0) / $TCK:.2f}')")
A_RSS=$(status_kb "$K" VmRSS); A_HWM=$(status_kb "$K" VmHWM)
A_KFDS=$(ls "/proc/$K/fd" | wc -l); A_AFDS=$(ls "/proc/$DPID/fd" | wc -l)
A_ARSS=$(status_kb "$DPID" VmRSS)
read -r A_PSS A_PRIV < <(private_kb "$K")
log "(a) idle: keeper pss ${A_PSS} kB, private dirty ${A_PRIV} kB"
log "(a) idle: keeper cpu ${A_CPU}s over ${DURATION}s, rss ${A_RSS} kB (peak $A_HWM), fds $A_KFDS; agent cpu ${A_AGENT_CPU}s, rss ${A_ARSS} kB, fds $A_AFDS"

# (b) one flooding process beside the N idle ones
cat > "$WORK/flood.json" <<EOF
{"meta":{"namespace":"bench","name":"flood"},"hosts":[{"ip":"127.0.0.1","bk_cloud_id":0,"bk_supplier_id":0}],
 "spec":{"identity":{"proc_name":"oyes","setup_path":"$WORK","pid_path":"","user":""},
 "control":{"start_cmd":"exec ./oyes FLOOD-0123456789abcdefghijklmnopqrstuvwxyz"},
 "resource":{"cpu":0,"mem":0},"monitor_policy":{"auto_type":1,"start_check_secs":0,"op_timeout":10}}}
EOF
curl -s --unix-socket "$WORK/run/agent.sock" -XPOST http://agent/v1/register_proc_info -d @"$WORK/flood.json" >/dev/null
"${CLI[@]}" start bench/flood >/dev/null
sleep 2
FP=$(pids_of_exe "$WORK/oyes" | head -1)
# The flood's own write rate: bytes it has written to its stdout (wchar of /proc/PID/io).
w0=$(awk '/^wchar/ {print $2}' "/proc/$FP/io"); c0=$(cpu_ticks "$K"); y0=$(cpu_ticks "$FP")
sleep "$DURATION"
w1=$(awk '/^wchar/ {print $2}' "/proc/$FP/io"); c1=$(cpu_ticks "$K"); y1=$(cpu_ticks "$FP")
B_CPU=$(python3 -c "print(f'{($c1 - $c0) / $TCK:.2f}')")
B_YES_CPU=$(python3 -c "print(f'{($y1 - $y0) / $TCK:.2f}')")
B_MBS=$(python3 -c "print(f'{($w1 - $w0) / $DURATION / 1048576:.1f}')")
B_LPS=$(python3 -c "print(f'{($w1 - $w0) / 43 / $DURATION / 1000:.0f}')")
B_RSS=$(status_kb "$K" VmRSS)
B_FILES=$(ls "$WORK/state/output/" | grep -c 'bench__flood\.' || true)
B_DISK=$(du -sk "$WORK/state/output" | cut -f1)
log "(b) flood: input ${B_MBS} MiB/s (${B_LPS} k lines/s), keeper cpu ${B_CPU}s over ${DURATION}s, yes cpu ${B_YES_CPU}s, keeper rss ${B_RSS} kB, flood files $B_FILES, output dir ${B_DISK} kB"
"${CLI[@]}" kill bench/flood >/dev/null || true

# (c) the keeper's base cost: a fresh keeper on an empty directory, before any agent
mkdir -p "$WORK/empty"
"$ROOT/target/release/procagentd" --output-keeper "$WORK/empty" 2>/dev/null &
EK=$!
sleep 0.5
C_RSS=$(status_kb "$EK" VmRSS)
read -r C_PSS C_PRIV < <(private_kb "$EK")
wait "$EK" 2>/dev/null || true
log "(c) a keeper with no pipe: rss ${C_RSS} kB, pss ${C_PSS} kB, private dirty ${C_PRIV} kB"

cat <<EOF
machine: $MACHINE; N=$N; DURATION=${DURATION}s; load at the end: $(cut -d' ' -f1-3 /proc/loadavg)
(a) idle, $((2 * N)) pipes: keeper cpu ${A_CPU} s, rss ${A_RSS} kB (peak ${A_HWM} kB), pss ${A_PSS} kB, private dirty ${A_PRIV} kB, fds ${A_KFDS}; agent cpu ${A_AGENT_CPU} s, rss ${A_ARSS} kB, fds ${A_AFDS}
(b) plus one flood: ${B_MBS} MiB/s in (${B_LPS} k lines/s), keeper cpu ${B_CPU} s, writer cpu ${B_YES_CPU} s, keeper rss ${B_RSS} kB, flood files ${B_FILES}, output dir ${B_DISK} kB
(c) keeper with no pipe: rss ${C_RSS} kB, pss ${C_PSS} kB, private dirty ${C_PRIV} kB
EOF

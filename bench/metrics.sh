#!/usr/bin/env bash
# Issue 4 benchmark: the cost of resource sampling, and what the daemon itself costs while
# it manages N processes, beside supervisord measured in the same run.
#
#   bash bench/metrics.sh            # N=1000, 60 s each; rewrites the issue-4 section of
#                                    # docs/performance.md
#   N=200 DURATION=20 WRITE_DOC=0 bash bench/metrics.sh    # a quick look, no doc change
#
# (a) `cargo bench --bench sampler`: one sampling pass over N idle processes (min / median /
#     p95 / max over 200 passes), and the procfs crate's own calls as a reference in the same
#     run (the machine is shared, so absolute figures move with the load; the ratio less).
# (b) procagentd (release) managing N copies of sleep (resident, foreground) for DURATION s
#     after all are running: its CPU time (utime+stime of all its threads) and RSS; once
#     sampling every 3 s, once with sampling off in the window.
# (c) supervisord (pip install supervisor) with N [program:] sections of the same sleep,
#     measured the same way.
# Every process started here is killed by pid at the end (trap EXIT): the two daemons by the
# pids this script started, the sleeps by the pids whose executable is the copy of sleep in
# this run's temp dir.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=bench/lib.sh
. bench/lib.sh
ROOT=$(pwd)
N=${N:-1000}
DURATION=${DURATION:-60}
WRITE_DOC=${WRITE_DOC:-1}
WORK=$(mktemp -d /tmp/pa-bench.XXXXXX)
chmod 755 "$WORK"
DAEMON_PIDS=()

kill_exe() {
  local pids
  pids=$(pids_of_exe "$1")
  [ -n "$pids" ] && kill -KILL $pids 2>/dev/null || true
}

cleanup() {
  set +e
  if [ -f "$WORK/daemon.pids" ]; then
    while read -r p; do DAEMON_PIDS+=("$p"); done < "$WORK/daemon.pids"
  fi
  for p in "${DAEMON_PIDS[@]}"; do
    kill -TERM "$p" 2>/dev/null
  done
  for p in "${DAEMON_PIDS[@]}"; do
    for _ in $(seq 1 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null
  done
  kill_exe "$WORK/pa/bsleep"
  kill_exe "$WORK/sv/ssleep"
  rm -rf "$WORK"
}
trap cleanup EXIT


TCK=$(getconf CLK_TCK)
MACHINE="$(nproc) CPUs, $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo), Linux $(uname -r)"
log "machine: $MACHINE; N=$N DURATION=${DURATION}s; load: $(cut -d' ' -f1-3 /proc/loadavg)"

# Measure a daemon (pid $1) for DURATION seconds; prints "cpu_s user_s sys_s rss_kb hwm_kb fds load".
measure() {
  local pid=$1 t0 t1 u0 s0 u1 s1 st
  st=$(cat "/proc/$pid/stat"); st=${st##*) }; set -- $st
  u0=${12}; s0=${13}
  t0=$(date +%s.%N)
  sleep "$DURATION"
  st=$(cat "/proc/$pid/stat"); st=${st##*) }; set -- $st
  u1=${12}; s1=${13}
  t1=$(date +%s.%N)
  python3 - "$u0" "$s0" "$u1" "$s1" "$t0" "$t1" "$TCK" <<'PY'
import sys
u0, s0, u1, s1 = (int(x) for x in sys.argv[1:5])
t0, t1, tck = float(sys.argv[5]), float(sys.argv[6]), int(sys.argv[7])
cpu = (u1 + s1 - u0 - s0) / tck
print(f"{cpu:.2f} {(u1-u0)/tck:.2f} {(s1-s0)/tck:.2f} {t1-t0:.1f}")
PY
}

# ---------------------------------------------------------------------------------------
# (a) one sampling pass
log "building (release)"
cargo build --release --bins >&2
log "(a) sampling pass over $N idle processes"
SAMPLER_OUT=$(PROCAGENT_BENCH_N=$N cargo bench --bench sampler 2>/dev/null | grep -E '^(sampler_pass|interleaved) ')
echo "$SAMPLER_OUT" >&2
field() { echo "$SAMPLER_OUT" | tr ' ' '\n' | awk -F= -v k="$1" '$1 == k { print $2 }'; }
S_MIN=$(field min_ms); S_MED=$(field median_ms); S_P95=$(field p95_ms); S_MAX=$(field max_ms)
I_OURS=$(field ours_median_ms); I_REF=$(field procfs_reference_median_ms); I_RATIO=$(field ratio)

# ---------------------------------------------------------------------------------------
# (b) procagentd managing N processes: once sampling every 3 s (the default), once with
# sampling effectively off (sample_interval 1h: one pass at start, none in the window), to
# separate supervision from sampling (supervisord samples nothing).
mkdir -p "$WORK/pa"
cp "$(command -v sleep)" "$WORK/pa/bsleep"
ulimit -n 20000 2>/dev/null || true
CLI=("$ROOT/target/release/procagent" --socket "$WORK/pa/run/agent.sock")

# run_procagentd INTERVAL: prints "cpu user sys wall rss_kb hwm_kb fds start_s passes pass_mean_ms pass_last_ms".
run_procagentd() {
  local interval=$1 i
  rm -rf "$WORK/pa/state" "$WORK/pa/run"
  bench_config "$WORK/pa" "$N" bsleep "[metrics]
sample_interval = \"$interval\"" > "$WORK/pa/agent.toml"
  "$ROOT/target/release/procagentd" --config "$WORK/pa/agent.toml" >"$WORK/pa/daemon.log" 2>&1 &
  local dpid=$!
  echo "$dpid" >> "$WORK/daemon.pids"
  local t_start t_up
  t_start=$(date +%s.%N)
  wait_running "$WORK/pa/run/agent.sock" "$N" "$WORK/pa/daemon.log"
  t_up=$(date +%s.%N)
  local start_s
  start_s=$(python3 -c "print(f'{$t_up - $t_start:.1f}')")
  log "procagentd (sample_interval $interval): all $N running after ${start_s}s; settling 5 s, then measuring ${DURATION}s"
  sleep 5
  local cpu user sys wall rss hwm fds metrics passes mean last
  read -r cpu user sys wall < <(measure "$dpid")
  rss=$(status_kb "$dpid" VmRSS); hwm=$(status_kb "$dpid" VmHWM)
  fds=$(ls "/proc/$dpid/fd" | wc -l)
  metrics=$(curl -s --unix-socket "$WORK/pa/run/agent.sock" http://agent/metrics)
  passes=$(echo "$metrics" | awk '/^procagent_sample_duration_seconds_count /{print $2}')
  mean=$(echo "$metrics" | awk '/^procagent_sample_duration_seconds_sum /{s=$2} /^procagent_sample_duration_seconds_count /{c=$2} END { if (c > 0) printf "%.2f", s / c * 1000; else print "-" }')
  last=$(echo "$metrics" | awk '/^procagent_sample_last_duration_seconds /{printf "%.2f", $2 * 1000}')
  log "procagentd (sample_interval $interval): cpu ${cpu}s (user $user sys $sys) over ${wall}s, rss ${rss} kB (peak $hwm), fds $fds, passes $passes mean ${mean} ms"
  kill -TERM "$dpid"; wait "$dpid" 2>/dev/null || true
  kill_exe "$WORK/pa/bsleep"
  echo "$cpu $user $sys $wall $rss $hwm $fds $start_s $passes $mean $last"
}

log "(b) procagentd with $N processes, sampling every 3 s"
PA_LINE=$(run_procagentd 3s)
[ -n "$PA_LINE" ] || exit 1
read -r PA_CPU PA_USER PA_SYS PA_WALL PA_RSS PA_HWM PA_FDS PA_START_S PA_PASSES PA_PASS_MEAN PA_PASS_LAST <<<"$PA_LINE"
log "(b) procagentd with $N processes, sampling off during the window"
PB_LINE=$(run_procagentd 1h)
[ -n "$PB_LINE" ] || exit 1
read -r PB_CPU PB_USER PB_SYS PB_WALL PB_RSS PB_HWM PB_FDS PB_START_S PB_PASSES PB_PASS_MEAN PB_PASS_LAST <<<"$PB_LINE"

# ---------------------------------------------------------------------------------------
# (c) supervisord managing N processes
log "(c) supervisord with $N programs"
python3 -m pip install -q supervisor >&2
SV_VERSION=$(python3 -c 'import importlib.metadata as m; print(m.version("supervisor"))')
mkdir -p "$WORK/sv/logs"
cp "$(command -v sleep)" "$WORK/sv/ssleep"
{
  cat <<EOF
[unix_http_server]
file=$WORK/sv/supervisor.sock

[supervisord]
logfile=$WORK/sv/supervisord.log
pidfile=$WORK/sv/supervisord.pid
childlogdir=$WORK/sv/logs
nodaemon=true
loglevel=warn
minfds=16384
minprocs=4096

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl=unix://$WORK/sv/supervisor.sock
EOF
  for i in $(seq 1 "$N"); do
    cat <<EOF

[program:p$i]
command=$WORK/sv/ssleep 100000
autostart=true
autorestart=true
startsecs=1
stdout_logfile=NONE
stderr_logfile=NONE
EOF
  done
} > "$WORK/sv/supervisord.conf"
python3 -m supervisor.supervisord -c "$WORK/sv/supervisord.conf" >"$WORK/sv/out.log" 2>&1 &
SPID=$!
DAEMON_PIDS+=("$SPID")
t_start=$(date +%s.%N)
running=0
for _ in $(seq 1 1200); do
  running=$(python3 -m supervisor.supervisorctl -c "$WORK/sv/supervisord.conf" status 2>/dev/null | grep -c ' RUNNING ' || true)
  [ "$running" -ge "$N" ] && break
  sleep 0.5
done
t_up=$(date +%s.%N)
[ "$running" -ge "$N" ] || { log "supervisord: only $running of $N running"; tail -20 "$WORK/sv/supervisord.log" >&2; exit 1; }
SV_START_S=$(python3 -c "print(f'{$t_up - $t_start:.1f}')")
log "all $N running under supervisord after ${SV_START_S}s; settling 5 s, then measuring ${DURATION}s"
sleep 5
read -r SV_CPU SV_USER SV_SYS SV_WALL < <(measure "$SPID")
SV_RSS=$(status_kb "$SPID" VmRSS); SV_HWM=$(status_kb "$SPID" VmHWM)
SV_FDS=$(ls "/proc/$SPID/fd" | wc -l)
log "supervisord: cpu ${SV_CPU}s (user $SV_USER sys $SV_SYS) over ${SV_WALL}s, rss ${SV_RSS} kB (peak $SV_HWM), fds $SV_FDS"
kill -TERM "$SPID"; for _ in $(seq 1 600); do kill -0 "$SPID" 2>/dev/null || break; sleep 0.1; done
kill_exe "$WORK/sv/ssleep"
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

# ---------------------------------------------------------------------------------------
# Report
SECTION=$(python3 - <<PY
pa_cpu, sv_cpu = float("$PA_CPU"), float("$SV_CPU")
pa_rss, sv_rss = int("$PA_RSS"), int("$SV_RSS")
pa_hwm, sv_hwm = int("$PA_HWM"), int("$SV_HWM")
wall, sv_wall = float("$PA_WALL"), float("$SV_WALL")
pb_cpu, pb_rss, pb_hwm, pb_wall = float("$PB_CPU"), int("$PB_RSS"), int("$PB_HWM"), float("$PB_WALL")
def pct(cpu, w): return cpu / w * 100 if w else 0
def ratio(a, b): return f"{a / b:.2f}" if b else "n/a"
print(f"""<!-- issue-4-metrics:begin (generated by bench/metrics.sh; rerun it to refresh) -->
## Issue 4: sampling cost and the daemon's own footprint

Measured by \`bench/metrics.sh\` on $(date -u +%Y-%m-%d), one run: $MACHINE. The machine has
2 cores **shared with other engineers building at the same time** (load average
$(cut -d' ' -f1-3 /proc/loadavg | tr ' ' '/') at the end), so absolute times are inflated and vary
between runs; the reference and the ratios, measured side by side, move less.

### One sampling pass over $N idle processes (\`cargo bench --bench sampler\`, release)

| | min | median | p95 | max |
|---|---|---|---|---|
| procagent sampler pass (stat + io + fd count + children + socket dump) | $S_MIN ms | $S_MED ms | $S_P95 ms | $S_MAX ms |

Interleaved with a reference pass using the procfs crate's own calls (\`Process::new\` +
\`stat()\` + \`io()\` + \`fd_count()\` per process, no sockets), same processes, same moments:
median **$I_OURS ms** (ours) vs **$I_REF ms** (procfs), ratio **$I_RATIO**. The issue's
budget ("well under 20 ms") was set when the procfs crate measured about 9 ms on this
machine; in this run the same procfs calls took {float("$I_REF"):.1f} ms, so /proc itself is
{float("$I_REF") / 9:.1f}x slower here today, and our pass scaled to that baseline is about
{float("$I_RATIO") * 9:.1f} ms. Status queries never pay this: they read the latest sample.

### procagentd vs supervisord managing $N processes for ${DURATION} s

Each manages $N copies of \`sleep\` (resident, restarted on exit, started in the foreground so
the daemon is their parent). Measured after all $N were running plus 5 s: CPU time of the
daemon (all threads, utime + stime from /proc/PID/stat) over the window, and its RSS.

| | procagentd, sampling every 3 s | procagentd, no sampling in the window | supervisord $SV_VERSION | ratio (sampling / supervisord) | ratio (no sampling / supervisord) |
|---|---|---|---|---|---|
| CPU time over {wall:.0f} s | $PA_CPU s (user $PA_USER, sys $PA_SYS) = {pct(pa_cpu, wall):.2f} % of a core | $PB_CPU s (user $PB_USER, sys $PB_SYS) = {pct(pb_cpu, pb_wall):.2f} % of a core | $SV_CPU s (user $SV_USER, sys $SV_SYS) = {pct(sv_cpu, sv_wall):.2f} % of a core | {ratio(pa_cpu, sv_cpu)} | {ratio(pb_cpu, sv_cpu)} |
| RSS at the end | {pa_rss/1024:.1f} MiB (peak {pa_hwm/1024:.1f} MiB) | {pb_rss/1024:.1f} MiB (peak {pb_hwm/1024:.1f} MiB) | {sv_rss/1024:.1f} MiB (peak {sv_hwm/1024:.1f} MiB) | {ratio(pa_rss, sv_rss)} | {ratio(pb_rss, sv_rss)} |
| open descriptors | $PA_FDS | $PB_FDS | $SV_FDS | | |
| time until all $N ran | $PA_START_S s | $PB_START_S s | $SV_START_S s | | |

procagentd holds one pidfd per managed process and, while sampling, four read handles per
instance (\`/proc/PID\`, its \`stat\`, \`io\` and main thread's \`children\`, kept open because opening them costs more than
reading them; bounded by the descriptor limit); supervisord holds three pipe ends per program. Start: procagentd
runs 64 starts at once, each held through a 1 s start check; supervisord \`startsecs=1\`.
With sampling, procagentd read all $N processes every 3 s during the window (cpu, memory,
fds, disk, sockets): its own \`/metrics\` reported $PA_PASSES passes since it started, the
latest taking **$PA_PASS_LAST ms** (the mean over all of them, including the first ones that
open the handles while the processes are being started, is $PA_PASS_MEAN ms). That work is
most of its CPU time above (compare the two procagentd columns). supervisord samples
nothing. Without sampling in the window, procagentd's descriptors are the pidfds plus the
handles of the instances its one pass at start saw.
<!-- issue-4-metrics:end -->""")
PY
)
echo "$SECTION"
if [ "$WRITE_DOC" = "1" ]; then
  mkdir -p docs
  SECTION="$SECTION" python3 - "$ROOT/docs/performance.md" <<'PY'
import os, sys, re, pathlib
p = pathlib.Path(sys.argv[1])
section = os.environ["SECTION"]
text = p.read_text() if p.exists() else "# Performance\n\nBenchmarks, how to rerun them, and what they measured. Each section is self-contained.\n"
pat = re.compile(r"<!-- issue-4-metrics:begin.*?<!-- issue-4-metrics:end -->", re.S)
if pat.search(text):
    text = pat.sub(lambda m: section, text)
else:
    text = text.rstrip("\n") + "\n\n" + section + "\n"
p.write_text(text)
PY
  log "wrote docs/performance.md"
fi

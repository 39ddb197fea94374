#!/usr/bin/env bash
# Side by side (issue 16): procagent, supervisord, runit and a floor supervising N copies of one
# tiny C worker, in one run on this machine, and a markdown table of the figures.
#
#   bash bench/compare.sh                      # N="100 1000", IDLE=30
#   N=100 IDLE=30 PROCAGENTD=/path/to/procagentd bash bench/compare.sh
#
# Knobs (environment): N (list of sizes, default "100 1000"), PROCAGENTD (the daemon measured,
# default target/release/procagentd; the CLI is the procagent next to it, or PROCAGENT),
# IDLE (seconds of the idle CPU window, 30), SETTLE (seconds before RSS and idle CPU, 10),
# KILLS (restart samples, 20), LOG_LEVEL (procagentd's, default its own default "info"),
# PHASES (default "procagent-config procagent-contained procagent-churn procagent-api supervisord
# runit floor": which to run), CHURN_CRASH and CHURN_HEALTH (the churn phase's crash-looping and failing-health
# definitions, 10 and 10), CRASH_AFTER_MS (how long a crash-looper lives, 1500),
# KEEP=1 keeps the temporary directory.
#
# The worker's first instruction reads CLOCK_MONOTONIC; it appends "<ns> <pid>" to the file
# named by its argument, then pause()s. Every start time below is taken with the same clock
# (bin/mono, just before the exec or the request), so figures are stamp differences:
#   start-all   from just before the supervisor is launched (procagent API: just before the
#               first register_proc_info request) to the last worker's first stamp;
#   status      median of 5 runs of the CLI listing all N;
#   RSS / PSS   after SETTLE s, summed over the supervisor's own processes (procagent: the
#               daemon and its output keeper; runit: runsvdir and every runsv);
#   CPU         utime + stime of those processes over IDLE s of idleness after SETTLE s;
#   restart     kill -9 of KILLS different workers, one at a time, at least 1 s apart: from
#               just before kill(2) to the replacement's first stamp; median and p95;
#   fds         descriptors of the procagentd process divided by N; and (config phase) the
#               same descriptors by kind, from their /proc/PID/fd links: pidfd, pipe, socket,
#               epoll, other anon_inode, /proc files (the sampler's kept handles, by name),
#               /dev, regular files; per kind in all and per supervised process; the output
#               keeper's too.
# The floor phase (floor): issue 16's floor, a C supervisor compiled here (bin/floor N DIR)
# that posix_spawns, for worker I, the very command procagent runs (/bin/sh -c "echo $$ >
# DIR/pids/pI.pid && exec WORKER DIR/stamps/pI", in DIR), then loops on waitpid(-1) and
# spawns whichever died again at once; nothing else. Measured as above (start-all from just
# before its exec, RSS / PSS and CPU of the floor process, restart); no status. Stopped with
# SIGTERM (it exits 0 and leaves its workers, killed by pid and checked gone). After each
# table: procagent (config)'s restart median and p95 divided by the floor's (issue 16's
# targets: 2x and 3x). Only the agent's own children: no phase here runs a pid-file daemon.
# The churn phase (procagent-churn): the config phase's N idle workers plus CHURN_CRASH
# crash-looping and CHURN_HEALTH failing-health definitions (namespace "churn", every
# [supervisor] setting its default: backoff 1 s doubling to 1 m, reset after 30 s,
# health_interval 10 s, health_failures 3; no max_restarts, so never given up), then after
# SETTLE s the agent's own processes (the daemon and its keeper, not what it starts) over
# IDLE s: their CPU against the config phase's idle CPU of the same N in the same run, RSS /
# PSS, the CPU of the children they reaped (cutime + cstime: crash-loopers, health_cmd
# shells), descriptors before and after, log lines written, and what happened in the window:
# crash-loop starts (their stamps) and restarts (status --json), health_cmd failures and
# liveness restarts (events), events by kind, states at its end. Its restart columns are
# the crash-loopers' own: from a crash-looper's exit stamp to its replacement's first stamp.
# The contained phase (procagent-contained): the config phase again with containment on,
# `cgroup_root` = a subtree this run creates below the cgroup v2 mount (procagent-bench-PID-N,
# killed and removed after the phase and at exit): every command is created in a cgroup of its
# own, stopped with cgroup.kill, sampled from its cgroup's files. The config phase is
# containment as this host runs it by default ("auto": off without systemd). Without v2
# controllers the limits are not applied (the agent's containment log line says which
# controllers it has; it goes into the details). No sync page or re-adoption here.
# Installs runit (apt, binaries only: no service is enabled) and supervisor (pip, pinned
# below) when missing. Root is expected (apt, smaps_rollup of every process).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"

SUPERVISOR_VERSION=4.2.5
N_LIST=${N:-"100 1000"}
PROCAGENTD=${PROCAGENTD:-$ROOT/target/release/procagentd}
PROCAGENT=${PROCAGENT:-$(dirname "$PROCAGENTD")/procagent}
IDLE=${IDLE:-30}
SETTLE=${SETTLE:-10}
KILLS=${KILLS:-20}
LOG_LEVEL=${LOG_LEVEL:-info}
STATUS_RUNS=5
# The command line, with the knobs of the phases that were given.
CMDLINE="N=\"$N_LIST\" IDLE=$IDLE SETTLE=$SETTLE KILLS=$KILLS"
for v in PHASES CHURN_CRASH CHURN_HEALTH CRASH_AFTER_MS; do
  if [ -n "${!v:-}" ]; then CMDLINE="$CMDLINE $v=\"${!v}\""; fi
done
PHASE_LIST=${PHASES:-procagent-config procagent-contained procagent-churn procagent-api supervisord runit floor}
CHURN_CRASH=${CHURN_CRASH:-10}
CHURN_HEALTH=${CHURN_HEALTH:-10}
CRASH_AFTER_MS=${CRASH_AFTER_MS:-1500}
CMDLINE="$CMDLINE PROCAGENTD=$PROCAGENTD bash bench/compare.sh"

DIAG=()         # a command run when a step fails, to show the supervisor's view
die() {
  log "FAILED: $*"
  if [ "${#DIAG[@]}" -gt 0 ]; then "${DIAG[@]}" >&2 || true; fi
  exit 1
}

[ -x "$PROCAGENTD" ] || die "no procagentd at $PROCAGENTD (cargo build --release --bins)"
[ -x "$PROCAGENT" ] || die "no procagent CLI at $PROCAGENT"
command -v gcc >/dev/null || die "gcc is needed"
command -v curl >/dev/null || die "curl is needed"

# ---------------------------------------------------------------- cleanup (by pid only)
TMP=$(mktemp -d /tmp/pa-compare.XXXXXX)
ROOTS=()       # pids of supervisors launched by this script (procagentd, supervisord, runsvdir)
CGROUPS=()     # cgroup v2 subtrees created by this script (the contained phase), removed at exit

# Is PID one of ours: its command line, executable or working directory names $TMP?
ours() {
  local p=$1 argv=()
  [ -d "/proc/$p" ] || return 1
  mapfile -d '' argv 2>/dev/null <"/proc/$p/cmdline" || return 1
  [[ "${argv[*]}" == *"$TMP"* ]] && return 0
  case "$(readlink "/proc/$p/exe" 2>/dev/null)$(readlink "/proc/$p/cwd" 2>/dev/null)" in
    *"$TMP"*) return 0 ;;
  esac
  return 1
}

# Every pid below $1 (one ps, walked in awk).
descendants() {
  ps -eo pid=,ppid= | awk -v root="$1" '
    { par[$1] = $2 }
    END {
      inset[root] = 1; changed = 1
      while (changed) { changed = 0
        for (p in par) if (!(p in inset) && (par[p] in inset)) { inset[p] = 1; changed = 1 } }
      for (p in inset) if (p != root) print p
    }'
}

# Worker pids named by the stamp files (the last line of each: the newest start).
stamp_pids() {
  find "$TMP" -path '*/stamps/*' -type f -size +0c -exec tail -q -n 1 {} + 2>/dev/null | awk '{ print $2 }'
  return 0
}

# Kill the supervisor ROOT and everything it started, by pid: the tree under it (taken while
# it lives), then the workers the stamps name, each only if it is ours.
kill_tree() {
  local root=$1 p victims alive
  victims=$(descendants "$root")
  kill -KILL "$root" 2>/dev/null || true
  for p in $victims $(stamp_pids); do
    if ours "$p"; then kill -KILL "$p" 2>/dev/null || true; fi
  done
  wait "$root" 2>/dev/null || true
  for _ in $(seq 1 100); do
    alive=0
    for p in $victims; do if ours "$p"; then alive=1 && break; fi; done
    [ $alive = 0 ] && break
    sleep 0.05
  done
  return 0
}

cleanup() {
  local rc=$? r
  trap - EXIT INT TERM
  for r in "${ROOTS[@]}"; do
    if [ -d "/proc/$r" ]; then kill_tree "$r"; fi
  done
  for r in $(stamp_pids); do
    if ours "$r"; then kill -KILL "$r" 2>/dev/null || true; fi
  done
  for r in "${CGROUPS[@]}"; do cg_remove "$r"; done
  if [ "${KEEP:-0}" = 1 ]; then log "kept $TMP"; else rm -rf "$TMP"; fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- peers
PY=$(python3 -c 'import sys; print(sys.executable)')   # the interpreter itself, not a pyenv shim
if ! command -v runsvdir >/dev/null || ! command -v runsv >/dev/null || ! command -v sv >/dev/null; then
  log "installing runit (apt)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y runit >"$TMP/apt.log" 2>&1 ||
    { apt-get update >>"$TMP/apt.log" 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y runit >>"$TMP/apt.log" 2>&1; } ||
    { tail -20 "$TMP/apt.log" >&2; die "apt-get install runit"; }
fi
if [ "$("$PY" -c 'import supervisor.options as o; print(o.VERSION)' 2>/dev/null)" != "$SUPERVISOR_VERSION" ]; then
  log "installing supervisor==$SUPERVISOR_VERSION (pip)"
  "$PY" -m pip install --quiet "supervisor==$SUPERVISOR_VERSION" || die "pip install supervisor==$SUPERVISOR_VERSION"
fi
SUPERVISOR_SEEN=$("$PY" -c 'import supervisor.options as o; print(o.VERSION)')
RUNSVDIR=$(command -v runsvdir) SV=$(command -v sv)

# ---------------------------------------------------------------- the C worker and clock
mkdir -p "$TMP/bin"
cat >"$TMP/bin/worker.c" <<'EOC'
/* worker STAMPFILE: first the CLOCK_MONOTONIC time, appended as "<ns> <pid>\n"; then pause. */
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>
int main(int argc, char **argv) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    if (argc < 2) return 2;
    char line[64];
    int n = snprintf(line, sizeof line, "%lld %d\n",
                     (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec, (int)getpid());
    int fd = open(argv[1], O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (fd < 0 || write(fd, line, n) != n) return 1;
    close(fd);
    for (;;) pause();
}
EOC
cat >"$TMP/bin/mono.c" <<'EOC'
/* mono now            print CLOCK_MONOTONIC ns
 * mono exec FILE CMD  write CLOCK_MONOTONIC ns to FILE, then exec CMD
 * mono kill PID       print CLOCK_MONOTONIC ns taken just before kill(PID, SIGKILL) */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
static long long now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}
int main(int argc, char **argv) {
    if (argc >= 2 && !strcmp(argv[1], "now")) { printf("%lld\n", now()); return 0; }
    if (argc >= 4 && !strcmp(argv[1], "exec")) {
        FILE *f = fopen(argv[2], "w");
        if (!f) { perror(argv[2]); return 1; }
        fprintf(f, "%lld\n", now());
        fclose(f);
        execvp(argv[3], argv + 3);
        perror(argv[3]);
        return 127;
    }
    if (argc >= 3 && !strcmp(argv[1], "kill")) {
        pid_t pid = (pid_t)atoi(argv[2]);
        long long t = now();
        if (pid <= 1 || kill(pid, SIGKILL) != 0) { fprintf(stderr, "kill %d: %s\n", pid, strerror(errno)); return 1; }
        printf("%lld\n", t);
        return 0;
    }
    fprintf(stderr, "usage: mono now | exec FILE CMD... | kill PID\n");
    return 2;
}
EOC
cat >"$TMP/bin/crasher.c" <<'EOC'
/* crasher STAMPFILE MS: appends "<ns> <pid>" (CLOCK_MONOTONIC, first instruction) to
 * STAMPFILE, lives MS ms, appends "<ns> <pid> exit" and exits with status 1. */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
static void stamp(const char *path, const char *tail) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    char line[80];
    int n = snprintf(line, sizeof line, "%lld %d%s\n",
                     (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec, (int)getpid(), tail);
    int fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (fd >= 0) { if (write(fd, line, n) != n) _exit(2); close(fd); }
}
int main(int argc, char **argv) {
    if (argc < 3) return 2;
    stamp(argv[1], "");
    long ms = atol(argv[2]);
    struct timespec d = { ms / 1000, (ms % 1000) * 1000000L };
    while (nanosleep(&d, &d) != 0) {}
    stamp(argv[1], " exit");
    return 1;
}
EOC
# The floor of issue 16: the least a supervisor can do to restart its children.
cat >"$TMP/bin/floor.c" <<'EOC'
/* floor N DIR: posix_spawn N children, child I (1..N) running exactly what procagent runs for
 * worker I, /bin/sh -c "echo $$ > DIR/pids/pI.pid && exec WORKER DIR/stamps/pI" (WORKER
 * compiled in), in DIR (procagent enters setup_path = DIR); then waitpid(-1) and spawn
 * whichever child died again, at once, the same way. Nothing else: the commands are built
 * once, before the first spawn; no attributes (the children inherit this process's
 * descriptors, environment and session); nothing written but errors. SIGTERM: exit 0 at once
 * (the children are left to the harness, which kills them by pid). */
#include <errno.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
extern char **environ;
static void on_term(int sig) { (void)sig; _exit(0); }
static char **cmds;
static pid_t *pids;
static void spawn(int i) {
    char *argv[] = { "/bin/sh", "-c", cmds[i], NULL };
    int e;
    while ((e = posix_spawn(&pids[i], "/bin/sh", NULL, NULL, argv, environ)) != 0) {
        fprintf(stderr, "floor: posix_spawn p%d: %s (again in 100 ms)\n", i + 1, strerror(e));
        struct timespec d = { 0, 100000000L };
        nanosleep(&d, NULL);
    }
}
int main(int argc, char **argv) {
    if (argc != 3 || atoi(argv[1]) < 1 || argv[2][0] != '/') {
        fprintf(stderr, "usage: floor N DIR (DIR absolute)\n");
        return 2;
    }
    int n = atoi(argv[1]);
    const char *dir = argv[2];
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_term;
    sigaction(SIGTERM, &sa, NULL);
    if (chdir(dir) != 0) { perror(dir); return 1; }
    cmds = calloc(n, sizeof *cmds);
    pids = calloc(n, sizeof *pids);
    if (!cmds || !pids) { perror("calloc"); return 1; }
    for (int i = 0; i < n; i++) {
        const char *fmt = "echo $$ > %s/pids/p%d.pid && exec %s %s/stamps/p%d";
        int len = snprintf(NULL, 0, fmt, dir, i + 1, WORKER_PATH, dir, i + 1);
        if (len < 0 || !(cmds[i] = malloc(len + 1))) { perror("malloc"); return 1; }
        snprintf(cmds[i], len + 1, fmt, dir, i + 1, WORKER_PATH, dir, i + 1);
    }
    for (int i = 0; i < n; i++) spawn(i);
    for (;;) {
        pid_t p = waitpid(-1, NULL, 0);
        if (p < 0) {
            if (errno == EINTR) continue;
            perror("floor: waitpid");
            return 1;
        }
        for (int i = 0; i < n; i++)
            if (pids[i] == p) { spawn(i); break; }
    }
}
EOC
gcc -O2 -o "$TMP/bin/worker" "$TMP/bin/worker.c" || die "gcc worker.c"
gcc -O2 -o "$TMP/bin/mono" "$TMP/bin/mono.c" || die "gcc mono.c"
gcc -O2 -o "$TMP/bin/crasher" "$TMP/bin/crasher.c" || die "gcc crasher.c"
gcc -O2 -DWORKER_PATH="\"$TMP/bin/worker\"" -o "$TMP/bin/floor" "$TMP/bin/floor.c" || die "gcc floor.c"
WORKER=$TMP/bin/worker MONO=$TMP/bin/mono CRASHER=$TMP/bin/crasher FLOOR=$TMP/bin/floor
CLK_TCK=$(getconf CLK_TCK)

# ---------------------------------------------------------------- measuring helpers
# wait_for SECS WHAT CMD...: poll CMD until it succeeds; past SECS, fail naming WHAT.
wait_for() {
  local secs=$1 what=$2 deadline
  shift 2
  deadline=$((SECONDS + secs))
  until "$@"; do
    ((SECONDS < deadline)) || die "timed out after ${secs} s: $what"
    sleep 0.05
  done
}

stamps_written() { [ "$(find "$1" -type f -size +0c | wc -l)" -ge "$2" ]; }
# The latest first stamp of the files in DIR (ns).
last_first_stamp() { awk 'FNR == 1 && $1 + 0 > m + 0 { m = $1 } END { print m }' "$1"/*; }
# When the workers of DIR wrote their first stamps, from T0 (ns): "10% A s, 50% B s, 90% C s".
stamp_spread() {
  awk 'FNR == 1 { print $1 }' "$1"/* | sort -n | awk -v t0="$2" '{ v[NR] = $1 }
    END { printf "first stamps after launch: 10%% %.2f s, 50%% %.2f s, 90%% %.2f s, last %.2f s",
      (v[int(NR * .1) + 1] - t0) / 1e9, (v[int(NR * .5) + 1] - t0) / 1e9, (v[int(NR * .9) + 1] - t0) / 1e9, (v[NR] - t0) / 1e9 }'
}
# How many runs started from A to B (ns), by the first stamps in FILES:
# starts_between A B FILES...
starts_between() {
  local a=$1 b=$2
  shift 2
  if [ ! -e "${1:-}" ]; then echo 0 && return 0; fi   # no file (an unmatched glob)
  awk -v a="$a" -v b="$b" 'NF == 2 && $1 >= a && $1 <= b { c++ } END { print c + 0 }' "$@"
}
# The largest mappings of PID by RSS (smaps, grouped by name): "name MiB, ...".
smaps_top() {
  awk '/^[0-9a-f]+-[0-9a-f]+ / { name = (NF >= 6) ? $6 : "[anon]"; sub(/.*\//, "", name) }
       $1 == "Rss:" { rss[name] += $2 }
       END { for (n in rss) printf "%d %s\n", rss[n], n }' "/proc/$1/smaps" 2>/dev/null |
    sort -rn | head -5 | awk '{ printf "%s%s %.1f MiB", (NR > 1 ? ", " : ""), $2, $1 / 1024 }'
}
ns_to_s() { awk -v d="$1" 'BEGIN { printf "%.2f", d / 1e9 }'; }
# Median and p95 (nearest rank) of the numbers on stdin: "median p95".
stats() { sort -g | awk '{ v[NR] = $1 } END { if (!NR) { print "- -"; exit }
  m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
  r = int(0.95 * NR); if (r < 0.95 * NR) r++; printf "%.1f %.1f\n", m, v[r] }'; }

# Sum over the pids on stdin: "rss_kB pss_kB" (smaps_rollup).
mem_of() {
  local p rss=0 pss=0 r s
  while read -r p; do
    r=$(awk '$1 == "Rss:" { print $2 }' "/proc/$p/smaps_rollup" 2>/dev/null || echo 0)
    s=$(awk '$1 == "Pss:" { print $2 }' "/proc/$p/smaps_rollup" 2>/dev/null || echo 0)
    rss=$((rss + ${r:-0})) pss=$((pss + ${s:-0}))
  done
  echo "$rss $pss"
}
# Fields A + B of /proc/PID/stat (counted after the ")" of the comm) summed over the pids on
# stdin: stat_sum A B.
stat_sum() {
  local p t=0 v
  while read -r p; do
    v=$(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null | awk -v a="$1" -v b="$2" '{ print $a + $b }' || echo 0)
    t=$((t + ${v:-0}))
  done
  echo "$t"
}
# utime + stime in ticks summed over the pids on stdin.
ticks_of() { stat_sum 12 13; }
kib_to_mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }

# Median wall time in ms of STATUS_RUNS runs of CMD, checking each listed at least N rows
# matching PATTERN: time_status N PATTERN CMD...
time_status() {
  local n=$1 pat=$2 i t0 t1 rows
  shift 2
  for i in $(seq 1 "$STATUS_RUNS"); do
    t0=$EPOCHREALTIME
    "$@" >"$TMP/status.out" 2>&1 || true
    t1=$EPOCHREALTIME
    rows=$(grep -o -E "$pat" "$TMP/status.out" | wc -l)
    [ "$rows" -ge "$n" ] || { head -5 "$TMP/status.out" >&2; die "status run $i of '$*' listed $rows of $n"; }
    awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f\n", (b - a) * 1000 }'
  done | stats | awk '{ print $1 }'
}

# Restart latency of KILLS workers spread over 1..N whose stamp files are in DIR; prints the
# latencies (ms), one a line, to FILE: restarts DIR N FILE
restarts() {
  local dir=$1 n=$2 out=$3 k i f pid before t_kill t_new lines deadline
  : >"$out"
  for k in $(seq 0 $((KILLS - 1))); do
    i=$((1 + k * n / KILLS))
    f=$dir/p$i
    mapfile -t lines <"$f"
    before=${#lines[@]}
    pid=${lines[before - 1]#* }
    ours "$pid" || die "restart: worker p$i (pid $pid) is not running"
    t_kill=$("$MONO" kill "$pid") || die "restart: kill p$i (pid $pid)"
    deadline=$((SECONDS + 15))
    while :; do
      mapfile -t lines <"$f"
      [ "${#lines[@]}" -gt "$before" ] && break
      ((SECONDS < deadline)) || die "timed out after 15 s: restart of p$i (killed pid $pid)"
      sleep 0.01
    done
    t_new=${lines[before]%% *}
    awk -v a="$t_kill" -v b="$t_new" 'BEGIN { printf "%.3f\n", (b - a) / 1e6 }' >>"$out"
    sleep 1
  done
}

# Our processes under ROOT that are not workers, and ROOT itself.
own_pids() {
  local root=$1 p
  echo "$root"
  for p in $(descendants "$root"); do
    [ "$(readlink "/proc/$p/exe" 2>/dev/null)" = "$WORKER" ] || echo "$p"
  done
}

# CPU seconds over IDLE s of the pids in FILE.
idle_cpu() {
  local a b
  a=$(ticks_of <"$1")
  sleep "$IDLE"
  b=$(ticks_of <"$1")
  awk -v d=$((b - a)) -v hz="$CLK_TCK" 'BEGIN { printf "%.2f", d / hz }'
}

# "PID COMM TICKS ..." on one line, for each pid on stdin (utime + stime, 0 once gone).
ticks_each() {
  local p v out=()
  while read -r p; do
    v=$(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null | awk '{ print $12 + $13 }' || echo 0)
    out+=("$p" "$(cat "/proc/$p/comm" 2>/dev/null || echo gone)" "${v:-0}")
  done
  echo "${out[*]}"
}

# utime + stime of the reaped children (cutime + cstime) in ticks, summed over the pids on
# stdin.
child_ticks_of() { stat_sum 14 15; }

# ROOT and its descendants that run the binary ROOT runs (the agent's daemon and its output
# keeper; not the processes it starts, nor its commands' shells).
agent_pids() {
  local root=$1 exe p
  exe=$(readlink "/proc/$root/exe") || die "pid $root is gone"
  echo "$root"
  for p in $(descendants "$root"); do
    [ "$(readlink "/proc/$p/exe" 2>/dev/null)" = "$exe" ] && echo "$p"
  done
  return 0
}

# How many descriptors PID holds. (A descriptor closed during the walk makes find fail:
# not an error here, nor below.)
ndesc() { { find "/proc/$1/fd" -mindepth 1 -maxdepth 1 2>/dev/null || true; } | wc -l; }

# The descriptors of PID by kind, from their /proc/PID/fd links, largest first, in brackets
# per supervised process (when N > 0): fd_kinds PID N. Kinds: pidfd, pipe, socket, epoll,
# anon_inode:[NAME] (eventfd, timerfd, signalfd, ...), /proc files by their path with the
# pids as N (the sampler's kept handles), /dev, regular files (named by basename).
fd_kinds() {
  { find "/proc/$1/fd" -mindepth 1 -maxdepth 1 -printf '%l\n' 2>/dev/null || true; } | awk -v n="$2" '
    {
      t = $0
      if (t == "") k = "unreadable"
      else if (t ~ /pidfd/) k = "pidfd"
      else if (t ~ /^pipe:/) k = "pipe"
      else if (t ~ /^socket:/) k = "socket"
      else if (t == "anon_inode:[eventpoll]") k = "epoll"
      else if (t ~ /^anon_inode:/) k = t
      else if (t ~ /^\/proc\//) { k = t; gsub(/\/[0-9]+/, "/N", k) }
      else if (t ~ /^\/dev\//) k = "/dev"
      else {
        k = "file"; f = t; sub(/.*\//, "", f)
        if (!(f in seen) && nf < 6) { seen[f] = 1; nf++; names = names (names == "" ? "" : ", ") f }
        else if (!(f in seen)) more = 1
      }
      c[k]++; all++
    }
    END {
      for (k in c) keys[++m] = k
      for (i = 1; i <= m; i++) for (j = i + 1; j <= m; j++)
        if (c[keys[j]] > c[keys[i]]) { x = keys[i]; keys[i] = keys[j]; keys[j] = x }
      printf "%d in all:", all
      for (i = 1; i <= m; i++) {
        k = keys[i]
        printf "%s %d %s", (i > 1 ? "," : ""), c[k], k
        if (k == "file") printf " (%s%s)", names, (more ? ", ..." : "")
        if (n > 0) printf " [%.2f]", c[k] / n
      }
    }'
}

# Show what the supervisor's own processes are (to the log).
show_pids() { log "$1 processes: $(ps -o pid=,rss=,args= -p "$(paste -sd, "$2")" | tr -s ' ' | paste -sd ';')"; }

ROWS=() DETAILS=()
row() { ROWS+=("| $1 | $2 | $3 | $4 | $5 | $6 | $7 |"); }

# After a supervisor PID was launched on N workers whose stamps go to DIR/stamps: wait for
# all first stamps, record the start-all (START, s) and its spread under LABEL, settle, list
# its own processes in DIR/own, run SHOW_CMD..., then measure RSS and PSS (kB) and the CPU
# over IDLE s (RSS, PSS, CPU): started_and_idle LABEL N DIR PID SHOW_CMD...
started_and_idle() {
  local label=$1 n=$2 d=$3 pid=$4 t0 t1
  shift 4
  wait_for $((120 + n / 5)) "$label N=$n: all $n workers' first stamps" stamps_written "$d/stamps" "$n"
  t0=$(cat "$d/t0") t1=$(last_first_stamp "$d/stamps")
  START=$(ns_to_s $((t1 - t0)))
  DETAILS+=("$label: $(stamp_spread "$d/stamps" "$t0")")
  log "$label N=$n: start-all $START s; settling ${SETTLE} s"
  sleep "$SETTLE"
  own_pids "$pid" >"$d/own"
  "$@"
  read -r RSS PSS < <(mem_of <"$d/own")
  log "$label N=$n: idle CPU over ${IDLE} s"
  CPU=$(idle_cpu "$d/own")
}

# ---------------------------------------------------------------- procagent
pa_config() { # pa_config DIR N
  local d=$1 n=$2 i
  cat <<EOT
[agent]
socket = "$d/run/agent.sock"
state_dir = "$d/state"
log_level = "$LOG_LEVEL"
log_target = "stderr"

[host]
ip = "127.0.0.1"
bk_cloud_id = 0
bk_supplier_id = 0
EOT
  for i in $(seq 1 "$n"); do
    pa_worker "$d" bench "p$i" "$d/pids/p$i.pid" "$d/stamps/p$i"
  done
}

# One worker's [[process]] table (managed, its pid in PIDFILE, first stamps in STAMPFILE),
# with EXTRA lines: pa_worker DIR NAMESPACE NAME PIDFILE STAMPFILE [EXTRA]
pa_worker() {
  cat <<EOT

[[process]]
namespace = "$2"
name = "$3"
setup_path = "$1"
proc_name = "worker"
pid_path = "$4"
start_cmd = "echo \$\$ > $4 && exec $WORKER $5"
${6:+$6
}start_check_secs = 1
autostart = true
EOT
}

# What a procagent sees, for a failed step: its states counted, stamps written, its log's end.
pa_diag() {
  log "diagnostics: $(find "$1/stamps" -type f -size +0c | wc -l) stamp files written"
  "$PROCAGENT" --socket "$1/run/agent.sock" status 2>&1 | awk 'NR > 1 { print $2 }' | sort | uniq -c
  "$PROCAGENT" --socket "$1/run/agent.sock" status 2>&1 | grep -v ' running ' | head -5
  tail -n 15 "$1/agent.log"
}

# Have all the tasks in DIR/multi.out finished (no key 115)? Leaves the results in results.out.
pa_tasks_done() {
  local id
  : >"$1/results.out"
  while read -r id; do
    curl -s --unix-socket "$1/run/agent.sock" -H 'Content-Type: application/json' \
      -d "{\"task_id\": \"$id\"}" http://agent/v1/get_proc_operate_result_v2 >>"$1/results.out" || return 1
    echo >>"$1/results.out"
  done < <(grep -o 'GSETASK:[0-9:]*' "$1/multi.out")
  ! grep -q '"error_code":115' "$1/results.out"
}

pa_healthy() { curl -sf --unix-socket "$1" http://agent/v1/healthz >/dev/null 2>&1; }

# A cgroup v2 subtree of this run's own for the contained phase (printed), or why not (status 1).
cg_subtree() {
  local mnt cg
  mnt=$(awk '$9 == "cgroup2" { print $5; exit }' /proc/self/mountinfo)
  [ -n "$mnt" ] || { echo "no cgroup v2 hierarchy is mounted"; return 1; }
  cg=$mnt/procagent-bench-$$-$1
  mkdir "$cg" 2>/dev/null || { echo "cannot create a cgroup below $mnt"; return 1; }
  echo "$cg"
}

# Kill what is left in a cgroup subtree of this run's and remove it, deepest first.
cg_remove() {
  local d
  [ -d "$1" ] || return 0
  echo 1 >"$1/cgroup.kill" 2>/dev/null || true
  for _ in $(seq 1 100); do
    grep -q '^populated 0' "$1/cgroup.events" 2>/dev/null && break
    sleep 0.05
  done
  find "$1" -depth -type d | while read -r d; do rmdir "$d" 2>/dev/null || true; done
  [ ! -d "$1" ] || log "could not remove the cgroup $1"
}

# run_procagent_config N [contained]: the agent with N [[process]] tables, containment off as
# this host's default ("auto" finds no systemd here), or on (contained: cgroup_root = a subtree
# of this run's own below the v2 mount, removed after; limits need controllers, which this
# host's v2 mount may not have: the phase logs what the agent reports).
run_procagent_config() {
  local n=$1 mode=${2:-} d=$TMP/pa-config-$1 label="procagent (config)" cg='' start pid t0 t1 rss pss cpu st stj fds med p95 p
  if [ "$mode" = contained ]; then
    d=$TMP/pa-contained-$n label="procagent (contained)"
    if ! cg=$(cg_subtree "$n"); then
      log "$label N=$n: not measured ($cg)"
      row "$label" "not measured: $cg" – – – – –
      return 0
    fi
    CGROUPS+=("$cg")
  fi
  mkdir -p "$d/stamps" "$d/pids"
  pa_config "$d" "$n" >"$d/agent.toml"
  if [ -n "$cg" ]; then printf '\n[supervisor]\ncgroup_root = "%s"\n' "$cg" >>"$d/agent.toml"; fi
  log "$label N=$n: starting"
  "$MONO" exec "$d/t0" "$PROCAGENTD" --config "$d/agent.toml" 2>"$d/agent.log" &
  pid=$!
  ROOTS+=("$pid")
  DIAG=(pa_diag "$d")
  wait_for $((120 + n / 5)) "$label N=$n: all $n workers' first stamps" stamps_written "$d/stamps" "$n"
  t0=$(cat "$d/t0") t1=$(last_first_stamp "$d/stamps")
  start=$(ns_to_s $((t1 - t0)))
  DETAILS+=("$label: $(stamp_spread "$d/stamps" "$t0")")
  log "$label N=$n: start-all $start s; settling ${SETTLE} s"
  if [ -n "$cg" ]; then
    DETAILS+=("$label: $(grep -o 'containment=.*' "$d/agent.log" | head -1); cgroups below $cg after start-all: $(find "$cg" -mindepth 1 -type d | wc -l)")
  fi
  wait_for 30 "$label N=$n: healthz" pa_healthy "$d/run/agent.sock"
  sleep "$SETTLE"
  own_pids "$pid" >"$d/own"
  show_pids procagent "$d/own"
  DETAILS+=("procagentd ($label) after settle: $(awk '$1 == "Threads:" { print $2 }' "/proc/$pid/status") threads, VmHWM $(status_kb "$pid" VmHWM) kB; largest mappings by RSS: $(smaps_top "$pid")")
  DETAILS+=("its processes: $(ps -o pid=,rss=,args= -p "$(paste -sd, "$d/own")" | awk '{ printf "%s%s (%s, RSS %.1f MiB)", (NR > 1 ? "; " : ""), $3, $1, $2 / 1024 }')")
  read -r rss pss < <(mem_of <"$d/own")
  log "$label N=$n: idle CPU over ${IDLE} s"
  cpu=$(idle_cpu "$d/own")
  st=$(time_status "$n" 'bench/p[0-9]+' "$PROCAGENT" --socket "$d/run/agent.sock" status)
  stj=$(time_status "$n" '"name": ?"p[0-9]+"' "$PROCAGENT" --socket "$d/run/agent.sock" status --json)
  fds=$(find "/proc/$pid/fd" -mindepth 1 -maxdepth 1 | wc -l)
  fds=$(awk -v f="$fds" -v n="$n" 'BEGIN { printf "%.2f (%d in all)", f / n, f }')
  DETAILS+=("procagentd ($label) descriptors by kind [per supervised process]: $(fd_kinds "$pid" "$n")")
  for p in $(tail -n +2 "$d/own"); do
    DETAILS+=("$(cat "/proc/$p/comm" 2>/dev/null || echo '?') (pid $p) descriptors by kind: $(fd_kinds "$p" 0)")
  done
  log "$label N=$n: $KILLS restarts"
  restarts "$d/stamps" "$n" "$d/restarts"
  read -r med p95 < <(stats <"$d/restarts")
  row "$label" "$start s" "$st ms (--json $stj ms)" \
    "$(kib_to_mib "$rss") MiB (PSS $(kib_to_mib "$pss"))" "$cpu s" "$med ms" "$p95 ms"
  if [ -z "$cg" ]; then
    PA_START=$start PA_CPU=$cpu PA_FDS=$fds PA_MED=$med PA_P95=$p95
    PA_LOG_LINES=$(wc -l <"$d/agent.log")
    PA_WARN=$(grep -c -E 'WARN|ERROR' "$d/agent.log" || true)
    pa_sync_page "$d" "$n" "$pid"
    pa_readopt "$d" "$n" "$pid"
    kill_tree "$PA_PID"
  else
    PC_FDS=$fds PC_MED=$med PC_P95=$p95
    PC_WARN=$(grep -c -E 'WARN|ERROR' "$d/agent.log" || true)
    kill_tree "$pid"
  fi
  # The output keeper outlives an agent: the first agent's, taken before the restart.
  while read -r p; do if ours "$p"; then kill -KILL "$p" 2>/dev/null || true; fi; done <"$d/own"
  if [ -n "$cg" ]; then cg_remove "$cg"; fi
}

# sync_proc_status pages of N (median of STATUS_RUNS) and the daemon's RSS before and after:
# pa_sync_page DIR N PID
pa_sync_page() {
  local d=$1 n=$2 pid=$3 before after later med i t0 t1 page
  page=$n
  [ "$page" -le 1000 ] || page=1000
  before=$(status_kb "$pid" VmRSS)
  med=$(for i in $(seq 1 "$STATUS_RUNS"); do
    t0=$EPOCHREALTIME
    curl -sf --unix-socket "$d/run/agent.sock" http://agent/v1/sync_proc_status \
      -d "{\"meta\":{\"namespace\":\"bench\"},\"page\":{\"start\":0,\"limit\":$page}}" >"$TMP/sync.out" ||
      die "sync_proc_status failed"
    t1=$EPOCHREALTIME
    awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f\n", (b - a) * 1000 }'
  done | stats | awk '{ print $1 }')
  after=$(status_kb "$pid" VmRSS)
  sleep 3
  later=$(status_kb "$pid" VmRSS)
  PA_SYNC="sync_proc_status page of $page: $med ms median; daemon RSS $(kib_to_mib "$before") MiB before, $(kib_to_mib "$after") just after, $(kib_to_mib "$later") 3 s later"
  log "procagent (config) N=$n: $PA_SYNC"
}

# Re-adoption: SIGTERM the agent, start it again; the time until every worker is reported
# running again, and that none was started anew (no new first stamps): pa_readopt DIR N PID
pa_readopt() {
  local d=$1 n=$2 pid=$3 stamps_before t0 t1 running i
  stamps_before=$(cat "$d/stamps"/* | wc -l)
  kill -TERM "$pid"
  for i in $(seq 1 200); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
  "$MONO" exec "$d/t0-readopt" "$PROCAGENTD" --config "$d/agent.toml" 2>>"$d/agent.log" &
  PA_PID=$!
  ROOTS+=("$PA_PID")
  running=0
  for i in $(seq 1 $((600 + n))); do
    if pa_healthy "$d/run/agent.sock"; then
      running=$("$PROCAGENT" --socket "$d/run/agent.sock" status 2>/dev/null | grep -c ' running ' || true)
      [ "$running" -ge "$n" ] && break
    fi
    sleep 0.05
  done
  t1=$("$MONO" now)
  t0=$(cat "$d/t0-readopt")
  [ "$running" -ge "$n" ] || die "re-adoption: $running of $n running"
  PA_READOPT="re-adoption after an agent restart: all $n running again $(ns_to_s $((t1 - t0))) s after its start; workers started anew: $(($(cat "$d/stamps"/* | wc -l) - stamps_before))"
  log "procagent (config) N=$n: $PA_READOPT"
}

# ---------------------------------------------------------------- procagent under churn
# The churn definitions (namespace "churn"), to append to pa_config's: pa_churn DIR
#
# Crash-looping, as an operator meets it: a service that comes up and dies again, over and
# over (it crashes at its first request, or finds its config bad after starting). Here it
# passes its start check (start_check_secs = 1) and exits with status 1 CRASH_AFTER_MS
# (1.5 s) after its start. The agent counts such a run as healthy (it passed its check and
# lasted 1 s), so it restarts it at once, every time: no backoff, never given up, about one
# start per 1.5 s per definition for as long as the agent runs. That is the steady churn
# measured. A process that dies at once (CRASH_AFTER_MS under 1000: within its start check)
# is a start failure instead, and backs off 1, 2, 4, ... s up to 1 m (not fatal: no
# max_restarts): attempts at about 0, 1, 3, 7, 15, 31, 63 s, then one a minute, little to
# measure; set CRASH_AFTER_MS=0 to see it (its restart columns are then the backoff delays).
# Failing health: the idle worker with health_cmd = "exit 1" (a shell per check), checked
# every health_interval (10 s); the third failure in a row is a liveness failure: stopped,
# and started again after a backoff (1 s, 2 s, ...: a run ends before backoff_reset, so the
# count keeps growing, to 1 m after about 4 minutes; no check runs while it waits).
pa_churn() {
  local d=$1 i
  for i in $(seq 1 "$CHURN_CRASH"); do
    cat <<EOT

[[process]]
namespace = "churn"
name = "crash$i"
setup_path = "$d"
proc_name = "crasher"
start_cmd = "exec $CRASHER $d/crash/stamps/c$i $CRASH_AFTER_MS"
start_check_secs = 1
autostart = true
EOT
  done
  for i in $(seq 1 "$CHURN_HEALTH"); do
    pa_worker "$d" churn "unhealthy$i" "$d/pids/u$i.pid" "$d/unhealthy/stamps/u$i" 'health_cmd = "exit 1"'
  done
}

# What happened to the definitions between two `status --json` and in the events after an
# id, up to a unix time in ms, one figure a line: pa_churn_counts BEFORE AFTER EVENTS UNTIL_MS
# (restarts of the crash-loopers, of the failing-health ones, of the idle workers; health_cmd
# failures; liveness restarts; events by kind; states at the end; the failing-health ones'
# largest backoff delay and failures in a row at the end).
pa_churn_counts() {
  "$PY" - "$@" <<'EOP'
import collections, json, sys
before, after, events, until = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
def procs(path):
    d = json.load(open(path))
    return {(p["namespace"], p["name"]): p for p in d["list"]}
def group(key):
    ns, name = key
    if ns != "churn":
        return "idle"
    return "crash" if name.startswith("crash") else "unhealthy"
b, a = procs(before), procs(after)
restarts = collections.Counter()
states = collections.defaultdict(collections.Counter)
delay = failures = 0
for k, p in a.items():
    g = group(k)
    restarts[g] += p.get("restarts", 0) - b.get(k, {}).get("restarts", 0)
    states[g][p.get("state", "?")] += 1
    if g == "unhealthy":
        delay = max(delay, p.get("restart_delay_secs") or 0)
        failures = max(failures, p.get("consecutive_failures") or 0)
d = json.load(open(events))
evs = [e for e in d.get("data", d)["events"] if e.get("ts_ms", 0) <= until]
kinds = collections.Counter(e["kind"] for e in evs)
print(restarts["crash"]); print(restarts["unhealthy"]); print(restarts["idle"])
print(kinds["health_check_failed"]); print(kinds["health_failed"])
print(", ".join("%s %d" % kv for kv in kinds.most_common()) or "none")
print("; ".join("%s: %s" % (g, ", ".join("%s %d" % kv for kv in sorted(states[g].items())))
                for g in ("crash", "unhealthy", "idle") if states[g]))
print("%.1f" % delay); print(failures)
EOP
}

# The last event's id (0 when none): pa_last_event SOCKET
pa_last_event() {
  curl -sf --unix-socket "$1" 'http://agent/v1/events?limit=1' |
    "$PY" -c 'import json, sys; d = json.load(sys.stdin); e = d.get("data", d)["events"]; print(e[-1]["id"] if e else 0)'
}

run_procagent_churn() {
  local n=$1 d=$TMP/pa-churn-$1 nc=$CHURN_CRASH nh=$CHURN_HEALTH pid rss pss rss1 pss1 p
  local e0 fd0 fd1 log0 log1 t_a t_b wall_b a b ca cb cpu split ccpu starts ustarts istarts med p95 more
  local r_crash r_unh r_idle hfail liveness kinds states delay fails label
  mkdir -p "$d/stamps" "$d/pids" "$d/crash/stamps" "$d/unhealthy/stamps"
  { pa_config "$d" "$n"; pa_churn "$d"; } >"$d/agent.toml"
  label="procagent (config, churn: $nc crash-looping, $nh failing health)"
  log "$label N=$n: starting"
  "$PROCAGENTD" --config "$d/agent.toml" 2>"$d/agent.log" &
  pid=$!
  ROOTS+=("$pid")
  DIAG=(pa_diag "$d")
  wait_for $((120 + n / 5)) "procagent (churn) N=$n: all $n workers' first stamps" stamps_written "$d/stamps" "$n"
  wait_for 60 "procagent (churn): $nh failing-health workers' first stamps" stamps_written "$d/unhealthy/stamps" "$nh"
  wait_for 60 "procagent (churn): $nc crash-loopers' first stamps" stamps_written "$d/crash/stamps" "$nc"
  wait_for 30 "procagent (churn) N=$n: healthz" pa_healthy "$d/run/agent.sock"
  log "procagent (churn) N=$n: all started; settling ${SETTLE} s"
  sleep "$SETTLE"
  agent_pids "$pid" >"$d/own"
  show_pids "procagent (churn)" "$d/own"
  read -r rss pss < <(mem_of <"$d/own")
  "$PROCAGENT" --socket "$d/run/agent.sock" status --json >"$d/before.json" || die "procagent (churn): status --json"
  e0=$(pa_last_event "$d/run/agent.sock") || die "procagent (churn): events"
  fd0=$(ndesc "$pid") log0=$(wc -l <"$d/agent.log")
  log "procagent (churn) N=$n: CPU over ${IDLE} s of churn"
  t_a=$("$MONO" now)
  a=$(ticks_each <"$d/own") ca=$(child_ticks_of <"$d/own")
  sleep "$IDLE"
  b=$(ticks_each <"$d/own") cb=$(child_ticks_of <"$d/own")
  t_b=$("$MONO" now) wall_b=$(date +%s%3N)
  fd1=$(ndesc "$pid") log1=$(wc -l <"$d/agent.log")
  read -r rss1 pss1 < <(mem_of <"$d/own")
  "$PROCAGENT" --socket "$d/run/agent.sock" status --json >"$d/after.json" || die "procagent (churn): status --json"
  curl -sf --unix-socket "$d/run/agent.sock" "http://agent/v1/events?limit=100000&after=$e0" >"$d/events.json" ||
    die "procagent (churn): events"
  # Per process (its comm), and in all.
  split=$(printf '%s\n%s\n' "$a" "$b" | awk -v hz="$CLK_TCK" 'NR == 1 { n = split($0, x, " ") }
    NR == 2 { split($0, y, " "); for (i = 1; i <= n; i += 3) printf "%s%s %.2f s", (i > 1 ? ", " : ""), x[i + 1], (y[i + 2] - x[i + 2]) / hz }')
  cpu=$(printf '%s\n%s\n' "$a" "$b" | awk -v hz="$CLK_TCK" '{ t[NR] = 0; n = split($0, x, " "); for (i = 3; i <= n; i += 3) t[NR] += x[i] }
    END { printf "%.2f", (t[2] - t[1]) / hz }')
  ccpu=$(awk -v d=$((cb - ca)) -v hz="$CLK_TCK" 'BEGIN { printf "%.2f", d / hz }')
  { read -r r_crash; read -r r_unh; read -r r_idle; read -r hfail; read -r liveness
    read -r kinds; read -r states; read -r delay; read -r fails; } < <(pa_churn_counts "$d/before.json" "$d/after.json" "$d/events.json" "$wall_b")
  # Starts in the window, from the stamps (first lines of each run), and the crash-loopers'
  # restart latency: from a run's exit stamp to the next run's first stamp.
  starts=$(starts_between "$t_a" "$t_b" "$d"/crash/stamps/*)
  ustarts=$(starts_between "$t_a" "$t_b" "$d"/unhealthy/stamps/*)
  istarts=$(($(cat "$d"/stamps/* | wc -l) - n))
  : >"$d/restarts"
  if [ "$nc" -gt 0 ]; then
    awk -v a="$t_a" -v b="$t_b" 'FNR == 1 { ex = "" }
      NF == 2 { if (ex != "" && $1 >= a && $1 <= b) printf "%.3f\n", ($1 - ex) / 1e6; ex = "" }
      NF >= 3 { ex = $1 }' "$d"/crash/stamps/* >"$d/restarts"
  fi
  read -r med p95 < <(stats <"$d/restarts")
  more=''
  if [ -n "$PA_CPU" ]; then
    more=$(awk -v c="$cpu" -v i="$PA_CPU" -v s=$((starts + ustarts + hfail)) 'BEGIN {
      printf " (the config phase, N idle only, in this run: %.2f s; the churn adds %.2f s", i, c - i
      if (s > 0) printf ", %.1f ms per start or health check", (c - i) * 1000 / s
      printf ")" }')
  fi
  if [ "$med" = - ]; then med=– p95=–; else med="$med ms" p95="$p95 ms"; fi
  row "$label" "–" "–" "$(kib_to_mib "$rss") MiB (PSS $(kib_to_mib "$pss"))" "$cpu s${PA_CPU:+ (config: $PA_CPU s)}" "$med" "$p95"
  DETAILS+=("$label over ${IDLE} s: the agent's CPU $cpu s ($split)$more; the children it reaped (crash-loopers, health_cmd shells) $ccpu s; crash-loopers started $starts times (their stamps; status restarts +$r_crash), from a run's exit to the next run's first stamp median $med, p95 $p95; health_cmd failed $hfail times, $liveness liveness restarts (the failing-health ones started $ustarts times; status restarts +$r_unh); the $n idle workers restarted $r_idle times ($istarts starts since the agent's start)")
  DETAILS+=("procagent (churn) at the end of the window: states $states; the failing-health ones' backoff delay up to $delay s, up to $fails failures in a row; RSS $(kib_to_mib "$rss1") MiB (PSS $(kib_to_mib "$pss1")); procagentd descriptors $fd0 before the window, $fd1 after; $((log1 - log0)) log lines in the window; events in the window by kind: $kinds")
  DETAILS+=("procagentd under churn, descriptors by kind [per supervised process, N + $((nc + nh))]: $(fd_kinds "$pid" $((n + nc + nh)))")
  kill_tree "$pid"
  while read -r p; do if ours "$p"; then kill -KILL "$p" 2>/dev/null || true; fi; done <"$d/own"
}

run_procagent_api() {
  local n=$1 d=$TMP/pa-api-$1 pid t0 t1 t_reg t_done failed why i c ok reg_ms op_ms rss pss start chunk items body
  mkdir -p "$d/stamps" "$d/pids" "$d/req"
  pa_config "$d" 0 >"$d/agent.toml"
  log "procagent (API) N=$n: starting an empty agent"
  "$PROCAGENTD" --config "$d/agent.toml" 2>"$d/agent.log" &
  pid=$!
  ROOTS+=("$pid")
  DIAG=(pa_diag "$d")
  wait_for 30 "procagent (API) N=$n: healthz" pa_healthy "$d/run/agent.sock"
  sleep 2
  # One curl for the N registrations (one connection when curl keeps it), then
  # operate_proc_multi (start, op 0) in chunks of at most 1000 items.
  : >"$d/register.curl"
  for i in $(seq 1 "$n"); do
    [ "$i" -gt 1 ] && echo next >>"$d/register.curl"
    printf '{"meta":{"namespace":"bench","name":"p%d"},"hosts":[{"ip":"127.0.0.1","bk_cloud_id":0}],"spec":{"identity":{"proc_name":"worker","setup_path":"%s","pid_path":"%s/pids/p%d.pid"},"control":{"start_cmd":"echo $$ > %s/pids/p%d.pid && exec %s %s/stamps/p%d"},"monitor_policy":{"auto_type":1,"start_check_secs":1}}}' \
      "$i" "$d" "$d" "$i" "$d" "$i" "$WORKER" "$d" "$i" >"$d/req/r$i.json"
    printf 'unix-socket = "%s"\nurl = "http://agent/v1/register_proc_info"\ndata-binary = "@%s"\nheader = "Content-Type: application/json"\nwrite-out = "\\n"\n' \
      "$d/run/agent.sock" "$d/req/r$i.json" >>"$d/register.curl"
  done
  : >"$d/multi.list"
  for ((start = 1; start <= n; start += 1000)); do
    chunk=$((start + 999 < n ? start + 999 : n))
    items=$(for i in $(seq "$start" "$chunk"); do
      printf '{"meta":{"namespace":"bench","name":"p%d"},"op_type":0,"hosts":[{"ip":"127.0.0.1","bk_cloud_id":0}]}\n' "$i"
    done | paste -sd,)
    body=$d/req/multi$start.json
    printf '{"proc_operate_req":[%s]}' "$items" >"$body"
    echo "$body" >>"$d/multi.list"
  done
  log "procagent (API) N=$n: register $n + operate_proc_multi"
  t0=$("$MONO" now)
  curl -s -K "$d/register.curl" >"$d/register.out" || die "procagent (API) N=$n: register curl failed"
  t_reg=$("$MONO" now)
  while read -r body; do
    curl -s --unix-socket "$d/run/agent.sock" -H 'Content-Type: application/json' \
      --data-binary "@$body" http://agent/v1/operate_proc_multi >>"$d/multi.out" || die "procagent (API) N=$n: operate_proc_multi curl failed"
    echo >>"$d/multi.out"
  done <"$d/multi.list"
  t1=$("$MONO" now)
  ok=$(grep -o '"error_code":0' "$d/register.out" | wc -l)
  [ "$ok" -ge "$n" ] || { head -c 600 "$d/register.out" >&2; die "procagent (API) N=$n: $ok of $n registrations succeeded"; }
  c=$(grep -c '"task_id"' "$d/multi.out" || true)
  [ "$c" -ge "$(wc -l <"$d/multi.list")" ] || { head -c 600 "$d/multi.out" >&2; die "procagent (API) N=$n: operate_proc_multi gave no task id"; }
  reg_ms=$(awk -v a="$t0" -v b="$t_reg" 'BEGIN { printf "%.0f", (b - a) / 1e6 }')
  op_ms=$(awk -v a="$t_reg" -v b="$t1" 'BEGIN { printf "%.0f", (b - a) / 1e6 }')
  # The tasks' results: polled until no key answers 115 (still running); a start that failed
  # is not retried by the agent (op 0 leaves it stopped), so it is reported, not waited for.
  wait_for $((120 + n / 5)) "procagent (API) N=$n: operate_proc_multi tasks finished" pa_tasks_done "$d"
  t_done=$("$MONO" now)
  failed=$(grep -o '"error_code":[0-9]*' "$d/results.out" | grep -vc '"error_code":0$' || true)
  if [ "$failed" -gt 0 ]; then
    why=$("$PY" -c 'import json, sys, collections
c = collections.Counter()
for line in open(sys.argv[1]):
    for v in json.loads(line)["data"].values():
        if v["error_code"]: c["%s: %s" % (v["error_code"], v["error_msg"][:160])] += 1
print("; ".join("%d x %s" % (k, m) for m, k in c.most_common(3)))' "$d/results.out")
    log "procagent (API) N=$n: $failed of $n starts failed: $why"
    DETAILS+=("procagent (API): $failed of $n starts FAILED ($why)")
  fi
  wait_for 60 "procagent (API) N=$n: $((n - failed)) workers' first stamps" stamps_written "$d/stamps" $((n - failed))
  t1=$(last_first_stamp "$d/stamps")
  PA_API_START="$(ns_to_s $((t1 - t0))) s"
  if [ "$failed" -gt 0 ]; then PA_API_START="$PA_API_START for $((n - failed)) ($failed failed)"; fi
  DETAILS+=("procagent (API): $(stamp_spread "$d/stamps" "$t0"); every task finished (no key 115) $(ns_to_s $((t_done - t0))) s after the first request")
  log "procagent (API) N=$n: start-all $PA_API_START (registrations ${reg_ms} ms, task id after ${op_ms} ms); settling ${SETTLE} s"
  sleep "$SETTLE"
  own_pids "$pid" >"$d/own"
  read -r rss pss < <(mem_of <"$d/own")
  row "procagent (API)" "$PA_API_START (register $reg_ms ms, task id $op_ms ms)" "–" \
    "$(kib_to_mib "$rss") MiB (PSS $(kib_to_mib "$pss"))" "–" "–" "–"
  kill_tree "$pid"
}

# ---------------------------------------------------------------- supervisord
run_supervisord() {
  local n=$1 d=$TMP/sd-$1 pid t0 t1 i rss pss cpu st med p95 minfds
  mkdir -p "$d/stamps" "$d/logs"
  minfds=$((4 * n + 256))
  [ "$minfds" -lt 1024 ] && minfds=1024
  {
    cat <<EOT
[unix_http_server]
file = $d/supervisor.sock

[supervisord]
nodaemon = true
logfile = $d/supervisord.log
pidfile = $d/supervisord.pid
childlogdir = $d/logs
minfds = $minfds

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl = unix://$d/supervisor.sock
EOT
    for i in $(seq 1 "$n"); do
      printf '\n[program:p%d]\ncommand = %s %s/stamps/p%d\nautostart = true\nautorestart = true\nstartsecs = 1\n' \
        "$i" "$WORKER" "$d" "$i"
    done
  } >"$d/supervisord.conf"
  log "supervisord $SUPERVISOR_SEEN N=$n: starting"
  "$MONO" exec "$d/t0" "$PY" -m supervisor.supervisord -c "$d/supervisord.conf" >"$d/stdout.log" 2>&1 &
  pid=$!
  ROOTS+=("$pid")
  started_and_idle supervisord "$n" "$d" "$pid" show_pids supervisord "$d/own"
  SD_START=$START rss=$RSS pss=$PSS cpu=$CPU
  st=$(time_status "$n" 'RUNNING' "$PY" -m supervisor.supervisorctl -c "$d/supervisord.conf" status)
  log "supervisord N=$n: $KILLS restarts"
  restarts "$d/stamps" "$n" "$d/restarts"
  read -r med p95 < <(stats <"$d/restarts")
  row "supervisord $SUPERVISOR_SEEN" "$SD_START s" "$st ms" \
    "$(kib_to_mib "$rss") MiB (PSS $(kib_to_mib "$pss"))" "$cpu s" "$med ms" "$p95 ms"
  SD_FDS=$(find "/proc/$pid/fd" -mindepth 1 -maxdepth 1 | wc -l)
  kill_tree "$pid"
}

# ---------------------------------------------------------------- runit
sv_loop() { local s; for s in "$1"/*; do "$SV" status "$s"; done; }

runit_own() { log "runit processes: $(wc -l <"$1") (runsvdir + runsv)"; }

run_runit() {
  local n=$1 d=$TMP/rn-$1 pid t0 t1 i rss pss cpu st stl med p95
  mkdir -p "$d/stamps" "$d/service"
  for i in $(seq 1 "$n"); do
    mkdir -p "$d/service/p$i"
    printf '#!/bin/sh\nexec %s %s/stamps/p%d\n' "$WORKER" "$d" "$i" >"$d/service/p$i/run"
    chmod +x "$d/service/p$i/run"
  done
  log "runit N=$n: starting runsvdir"
  "$MONO" exec "$d/t0" "$RUNSVDIR" "$d/service" >"$d/runsvdir.log" 2>&1 &
  pid=$!
  ROOTS+=("$pid")
  started_and_idle runit "$n" "$d" "$pid" runit_own "$d/own"
  RN_START=$START rss=$RSS pss=$PSS cpu=$CPU
  st=$(time_status "$n" '^run: ' "$SV" status "$d"/service/*)
  stl=$(time_status "$n" '^run: ' sv_loop "$d/service")
  log "runit N=$n: $KILLS restarts"
  restarts "$d/stamps" "$n" "$d/restarts"
  read -r med p95 < <(stats <"$d/restarts")
  row "runit" "$RN_START s" "$st ms (one sv per dir: $stl ms)" \
    "$(kib_to_mib "$rss") MiB summed, PSS $(kib_to_mib "$pss") MiB" "$cpu s" "$med ms" "$p95 ms"
  kill_tree "$pid"
}

# ---------------------------------------------------------------- the floor
# Issue 16's floor: bin/floor (above), waitpid + posix_spawn of the same command procagent
# runs, the workers its own children. Measured as the others; its status cell is empty (it
# has no status), and at its end it is stopped with SIGTERM (it must exit 0, leaving its
# workers), then its workers are killed by pid and checked gone.
run_floor() {
  local n=$1 d=$TMP/floor-$1 pid t0 t1 rss pss cpu med p95 victims p st rc started left r keep
  mkdir -p "$d/stamps" "$d/pids"
  log "floor N=$n: starting"
  "$MONO" exec "$d/t0" "$FLOOR" "$n" "$d" >"$d/floor.log" 2>&1 &
  pid=$!
  ROOTS+=("$pid")
  DIAG=(tail -n 5 "$d/floor.log")
  started_and_idle floor "$n" "$d" "$pid" show_pids floor "$d/own"
  FL_START=$START rss=$RSS pss=$PSS cpu=$CPU
  log "floor N=$n: $KILLS restarts"
  restarts "$d/stamps" "$n" "$d/restarts"
  read -r med p95 < <(stats <"$d/restarts")
  FL_MED=$med FL_P95=$p95
  row "floor (C: waitpid + posix_spawn, same sh command)" "$FL_START s" "–" \
    "$(kib_to_mib "$rss") MiB (PSS $(kib_to_mib "$pss"))" "$cpu s" "$med ms" "$p95 ms"
  # Stop it: SIGTERM, up to 5 s to exit (gone, or a zombie: exited, not yet waited for), its
  # status.
  victims=$(descendants "$pid")
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do
    st=$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f1 || true)
    [ -z "$st" ] || [ "$st" = Z ] && break
    sleep 0.05
  done
  if [ -n "$st" ] && [ "$st" != Z ]; then
    log "floor N=$n: still running 5 s after SIGTERM; killed"
    DETAILS+=("floor: did NOT exit on SIGTERM within 5 s (killed)")
    kill_tree "$pid"
  else
    rc=0
    wait "$pid" || rc=$?
    [ "$rc" = 0 ] || DETAILS+=("floor: exited with status $rc on SIGTERM (expected 0)")
  fi
  # Reaped: its pid is no longer ours to kill (cleanup's kill_tree would take a reused pid).
  keep=()
  for r in "${ROOTS[@]}"; do [ "$r" = "$pid" ] || keep+=("$r"); done
  ROOTS=("${keep[@]}")
  # Its workers (the tree taken before the SIGTERM, and every pid its stamps name), by pid;
  # then none of them may be left.
  for p in $victims $(awk '{ print $2 }' "$d"/stamps/*); do
    if ours "$p"; then kill -KILL "$p" 2>/dev/null || true; fi
  done
  started=$(cat "$d"/stamps/* | wc -l)
  for _ in $(seq 1 100); do
    left=$(awk '{ print $2 }' "$d"/stamps/* | while read -r p; do if ours "$p"; then echo "$p"; fi; done | paste -sd' ')
    [ -z "$left" ] && break
    sleep 0.05
  done
  [ -z "$left" ] || die "floor N=$n: workers left after the phase: $left"
  log "floor N=$n: stopped (SIGTERM: status ${rc:-killed}); its $started workers are all gone"
}

# "R.Rx" for A / B (ms figures as stats prints them), "–" when either is missing or B is 0.
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "-" || b == "-" || a == "" || b == "" || b + 0 == 0) print "–"; else printf "%.1fx\n", a / b }'; }

# ---------------------------------------------------------------- run
STARTED=$(date -u '+%Y-%m-%d %H:%M:%S UTC')
T_BEGIN=$SECONDS
COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
DIRTY=
if git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null | grep -q .; then DIRTY=+dirty; fi
MACHINE="$(nproc) CPUs, MemTotal $(awk '/MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo), Linux $(uname -r)"
OUT=$TMP/tables.md
: >"$OUT"
for n in $N_LIST; do
  ROWS=() DETAILS=() PA_FDS='' SD_FDS='' PA_LOG_LINES='' PA_WARN='' PA_SYNC='' PA_READOPT='' PA_CPU=''
  PA_MED='' PA_P95='' FL_MED='' FL_P95='' PC_MED='' PC_P95='' PC_FDS='' PC_WARN=''
  T_N=$SECONDS
  log "=== N=$n (load average $(cut -d' ' -f1-3 /proc/loadavg))"
  for phase in $PHASE_LIST; do
    DIAG=()
    case $phase in
      procagent-config) run_procagent_config "$n" ;;
      procagent-contained) run_procagent_config "$n" contained ;;
      procagent-churn) run_procagent_churn "$n" ;;
      procagent-api) run_procagent_api "$n" ;;
      supervisord) run_supervisord "$n" ;;
      runit) run_runit "$n" ;;
      floor) run_floor "$n" ;;
      *) die "unknown phase $phase" ;;
    esac
  done
  {
    echo
    echo "| N = $n | start-all | status | RSS | CPU / ${IDLE} s idle | restart median | restart p95 |"
    echo "|---|---|---|---|---|---|---|"
    printf '%s\n' "${ROWS[@]}"
    echo
    # Issue 16's target against the floor: only for the agent's own children. This script has
    # no pid-file daemon case (each procagent phase's worker is the agent's child, its pid file
    # naming that child); bench/restart_latency.sh measures the daemon case, without a floor.
    if [ -n "$PA_MED" ] && [ -n "$FL_MED" ]; then
      echo "procagent (config) restart against the floor (its own children; no pid-file daemon case here):" \
        "median $(ratio "$PA_MED" "$FL_MED") the floor (target 2x), p95 $(ratio "$PA_P95" "$FL_P95") (target 3x)."
    else
      echo "procagent (config) restart against the floor: – (needs the phases procagent-config and floor)."
    fi
    if [ -n "$PC_MED" ] && [ -n "$FL_MED" ]; then
      echo "procagent (contained) restart against the floor: median $(ratio "$PC_MED" "$FL_MED"), p95 $(ratio "$PC_P95" "$FL_P95")."
    fi
    echo "procagentd descriptors per process: ${PA_FDS:-–} (contained: ${PC_FDS:-–}, ${PC_WARN:-–} WARN/ERROR log lines); supervisord holds ${SD_FDS:-–} descriptors."
    echo "procagent (config): ${PA_SYNC:-–}; ${PA_READOPT:-–}."
    echo "procagentd log (config case): ${PA_LOG_LINES:-–} lines, ${PA_WARN:-–} WARN/ERROR. This size took $((SECONDS - T_N)) s;" \
      "load average at its end $(cut -d' ' -f1-3 /proc/loadavg)."
    echo
    printf -- '- %s\n' "${DETAILS[@]}"
  } >>"$OUT"
done

echo "## bench/compare.sh"
echo
echo "- command: \`$CMDLINE\`"
echo "- date: $STARTED; commit: $COMMIT$DIRTY; procagentd: $PROCAGENTD"
echo "- machine: $MACHINE"
echo "- peers: supervisor $SUPERVISOR_SEEN (pip), runit $(dpkg-query -W -f='${Version}' runit 2>/dev/null || echo '?') (apt)"
echo "- restart: $KILLS kills of different workers, at least 1 s apart; status: median of $STATUS_RUNS"
cat "$OUT"
echo
echo "Whole run: $((SECONDS - T_BEGIN)) s."

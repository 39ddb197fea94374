# Helpers shared by the bench scripts (sourced, not run).

log() { printf '[bench %s] %s\n' "$(date +%T)" "$*" >&2; }

# Pids of live processes whose executable is $1 (an exact path).
pids_of_exe() {
  local want=$1 p exe
  for p in /proc/[0-9]*; do
    exe=$(readlink "$p/exe" 2>/dev/null || true)
    [ "$exe" = "$want" ] && echo "${p#/proc/}"
  done
  return 0
}

# A field of /proc/PID/status in kB: status_kb PID VmRSS.
status_kb() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status"; }

# The config of a bench agent whose socket and state are under DIR, with N copies of PROG
# (in DIR) started in the foreground and managed, and EXTRA TOML sections:
# bench_config DIR N PROG EXTRA > DIR/agent.toml
bench_config() {
  local dir=$1 n=$2 prog=$3 extra=$4 i
  cat <<EOT
[agent]
socket = "$dir/run/agent.sock"
state_dir = "$dir/state"
log_level = "warn"

[host]
ip = "127.0.0.1"
bk_cloud_id = 0
bk_supplier_id = 0

$extra
EOT
  for i in $(seq 1 "$n"); do
    cat <<EOT

[[process]]
namespace = "bench"
name = "p$i"
setup_path = "$dir"
proc_name = "$prog"
start_cmd = "exec ./$prog 100000"
start_check_secs = 1
autostart = true
EOT
  done
}

# Wait (up to 10 minutes) until the agent of SOCKET runs N processes; on failure, show the
# end of LOG and exit: wait_running SOCKET N LOG
wait_running() {
  local sock=$1 n=$2 logf=$3 running=0
  for _ in $(seq 1 1200); do
    running=$("$ROOT/target/release/procagent" --socket "$sock" --json health 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["running"])' 2>/dev/null || echo 0)
    [ "$running" -ge "$n" ] && return 0
    sleep 0.5
  done
  log "only $running of $n running"
  tail -20 "$logf" >&2
  exit 1
}

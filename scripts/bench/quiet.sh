# Sourced by the benchmark scripts: wait until the machine is quiet before timing.
# wait_quiet waits (up to QUIET_MAX_WAIT seconds) until the CPUs are at least QUIET_IDLE
# percent idle over 3 s, since on a 2-core box a concurrent cargo build halves the figures
# and makes 2-thread OpenMP runs thrash.

idle_pct() {
  local a b
  a=($(head -1 /proc/stat)); sleep 3; b=($(head -1 /proc/stat))
  local idle=$(( (b[4] + b[5]) - (a[4] + a[5]) )) total=0 i
  for i in 1 2 3 4 5 6 7 8; do total=$(( total + b[i] - a[i] )); done
  echo $(( total > 0 ? 100 * idle / total : 100 ))
}

wait_quiet() {
  local waited=0 idle
  while idle=$(idle_pct); [ "$idle" -lt "${QUIET_IDLE:-90}" ]; do
    waited=$(( waited + 3 ))
    if [ "$waited" -ge "${QUIET_MAX_WAIT:-600}" ]; then
      echo "warning: machine still busy (${idle}% idle), running anyway" >&2
      return
    fi
  done
}

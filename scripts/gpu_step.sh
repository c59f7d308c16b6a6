# Sourced by scripts/gpu_quick.sh and scripts/gpu_candle.sh: `step`, one time-limited
# command of a GPU check, its output appended to a log in $OUT, a failure recorded in
# `rc`, and the log's summary lines (those matching $summary, the last $summary_lines)
# printed. The caller sets OUT, start, rc, summary and summary_lines.
step() {  # step SECONDS LOGFILE COMMAND...
  local limit=$1 log=$2; shift 2
  echo "== $* ($(( $(date +%s) - start ))s, limit ${limit}s)" | tee -a "$OUT/$log"
  timeout --kill-after=5 "$limit" "$@" >>"$OUT/$log" 2>&1
  local r=$?
  [ $r = 0 ] || rc=1
  echo "rc=$r" | tee -a "$OUT/$log"
  grep -E "$summary" "$OUT/$log" | tail -n "$summary_lines"
}

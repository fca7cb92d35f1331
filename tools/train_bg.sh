#!/bin/sh
# Train in the background, detached from the terminal, and follow the run's log:
#
#   sh tools/train_bg.sh --config-file config/digits.yaml [KEY VALUE ...] [--resume]
#
# Every argument goes to tools/train_net.py unchanged. Without OUTPUT_DIR among them, the run writes to
# output/<timestamp> under the repository (the script adds OUTPUT_DIR so that it knows where the log is).
# The training runs in its own session with stdin from /dev/null: closing the terminal or pressing Ctrl+C
# does not reach it. Ctrl+C only stops following the log; stop the training itself with
# `kill -INT <PID>` (it saves a checkpoint and exits; continue with the same command plus --resume).
# What the process prints before its log.txt exists (e.g. a config error) goes to OUTPUT_DIR/console.txt.
set -u

REPO=$(cd "$(dirname "$0")/.." && pwd -P)
PYTHON="$REPO/.venv/bin/python"
[ -x "$PYTHON" ] || PYTHON=python3

# shellcheck disable=SC1091  # tools/output_dir.sh, checked on its own
. "$REPO/tools/output_dir.sh"
output_dir=$(output_dir_of "$@")
if [ -z "$output_dir" ]; then
    output_dir="$REPO/output/$(date +%Y%m%d-%H%M%S)"
    set -- "$@" OUTPUT_DIR "$output_dir"
fi
if ! mkdir -p "$output_dir" 2>/dev/null || [ ! -w "$output_dir" ]; then
    echo "error: cannot write to OUTPUT_DIR $output_dir; choose a writable folder with OUTPUT_DIR <path>" >&2
    exit 2
fi
log="$output_dir/log.txt"
console="$output_dir/console.txt"
# Follow only this run's lines: a resumed run appends to the log.txt of the earlier ones.
skip=0
[ -f "$log" ] && skip=$(wc -c <"$log")

pid=""
follower=""
# shellcheck disable=SC2329 # called by the trap below
stop_following() {
    [ -n "$follower" ] && kill "$follower" 2>/dev/null
    echo
    echo "stopped following; the training goes on (PID $pid, log: $log)"
    exit 0
}
trap stop_following INT TERM HUP

# A background job of a non-interactive shell is no process-group leader, so setsid starts a new session
# without forking and $! is the training's own PID.
if command -v setsid >/dev/null 2>&1; then
    setsid "$PYTHON" "$REPO/tools/train_net.py" "$@" </dev/null >>"$console" 2>&1 &
else
    nohup "$PYTHON" "$REPO/tools/train_net.py" "$@" </dev/null >>"$console" 2>&1 &
fi
pid=$!
echo "training started: PID $pid"
echo "log: $log"
echo "(Ctrl+C stops following the log, not the training; stop the training with: kill -INT $pid)"

follow() {
    while [ ! -f "$log" ]; do
        sleep 1
    done
    exec tail -c +$((skip + 1)) -f "$log"
}
follow &
follower=$!

wait "$pid"
status=$?
sleep 1 # let tail print the last lines
kill "$follower" 2>/dev/null
if [ ! -f "$log" ]; then
    cat "$console" >&2 # it stopped before writing its log: show why
fi
echo "training (PID $pid) exited with status $status"
exit "$status"

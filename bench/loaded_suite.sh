#!/usr/bin/env bash
# The test suite on a loaded machine: BUSY busy-loop processes (default 2, one per core here) run
# beside the command (default `make test`) for its whole run, and are stopped when it ends, however
# it ends. The suite must pass so: a test that does is not tuned to an idle machine's timing.
#   bench/loaded_suite.sh                       make test beside 2 busy loops
#   BUSY=4 bench/loaded_suite.sh make test-long  another load, another command
set -uo pipefail
cd "$(dirname "$0")/.."
BUSY=${BUSY:-2}
[ $# -gt 0 ] || set -- make test
loops=()
stop_loops() { [ ${#loops[@]} -eq 0 ] || kill "${loops[@]}" 2>/dev/null; wait "${loops[@]}" 2>/dev/null; }
trap stop_loops EXIT
trap 'exit 130' INT TERM
for _ in $(seq "$BUSY"); do
    python3 -c 'while True: pass' &
    loops+=($!)
done
echo "loaded_suite: $BUSY busy loops (pids ${loops[*]}) beside: $*" >&2
started=$(date +%s)
"$@"
status=$?
echo "loaded_suite: exit $status after $(( $(date +%s) - started )) s beside $BUSY busy loops" >&2
exit $status

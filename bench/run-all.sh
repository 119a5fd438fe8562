#!/usr/bin/env bash
# Every benchmark in one command: installs what they need (Debian packages, npm modules),
# builds, then runs each bench in turn under the machine's heavy-work lock, so nothing
# else measured on the same cores runs at the same time. Each bench replaces its own
# section of docs/benchmarks.md and writes its raw runs to bench/results/; the last step
# writes the goals summary at the top of docs/benchmarks.md from those results.
#
#   bench/run-all.sh            full runs (about two hours on 2 cores; the real-OS boots are half of it)
#   bench/run-all.sh --quick    smoke runs of every bench (docs/benchmarks.md untouched)
#
# Needs root: the streaming, deploy-mode and scaling benches build network namespaces.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
[ -x node_modules/.bin/tsc ] || npm ci
npx tsc -p tsconfig.json
LOCK=/tmp/heavy.lock
extra=("$@")
bench() {
  echo "=== bench $* ${extra[*]}" >&2
  flock "$LOCK" node "dist/bench/$1.js" "${@:2}" "${extra[@]}"
}
bench hotpath
bench hotpath --tcp
bench streaming
bench deploy-modes --image busybox   # issue #7's goals: 1 and 8 GiB, the fio part
bench deploy-modes                   # the real OS (Debian 12, UEFI) to the login prompt: issue #14's goals
bench scaling
bench control-plane                  # issue #15: 200 deployments through one and two driver processes
bench fleet                          # issue #15: one image to 1/4/8 nodes, peers off and on (loopback)
bench peer-serve                     # issue #15: host reads while the agent serves peers
case " ${extra[*]} " in
  *" --quick "*) ;;
  *) node dist/bench/summary.js ;;
esac

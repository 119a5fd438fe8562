#!/usr/bin/env bash
# The test command (`npm test`): installs what is missing, builds, runs every mocha test,
# and ends with a line "N passed, N failed".
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
if [ ! -d node_modules ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  npm ci --no-audit --no-fund
fi
# Generated code is generated: fail when openapi/generated/ no longer matches the YAML.
bash scripts/gen-openapi.sh --check
npx tsc -p tsconfig.json
# Test builds poison pooled NBD reply buffers on release and check them on reuse: a late
# write into a finished request's buffer stops the agent (dpu-agent/src/nbd/buffer-pool.ts).
export DPU_AGENT_POISON_BUFFERS=1
exec npx mocha "$@"

#!/usr/bin/env bash
# `npm run lab`: installs what is missing, builds, and runs lab/lab.ts (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
if [ ! -d node_modules ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  npm ci --no-audit --no-fund
fi
npx tsc -p tsconfig.json
exec node dist/lab/lab.js "$@"

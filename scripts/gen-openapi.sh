#!/usr/bin/env bash
# Generates TypeScript types from openapi/*.yaml with openapi-typescript.
# --check: regenerate into a temp dir and fail if the committed files differ (stale).
set -euo pipefail
cd "$(dirname "$0")/.."
out=openapi/generated
if [ "${1:-}" = --check ]; then
  out=$(mktemp -d)
  trap 'rm -rf "$out"' EXIT
fi
for spec in dpu-agent driver; do
  npx openapi-typescript "openapi/$spec.yaml" -o "$out/$spec.ts" --immutable --default-non-nullable false >/dev/null 2>&1 \
    || { npx openapi-typescript "openapi/$spec.yaml" -o "$out/$spec.ts" --immutable --default-non-nullable false; exit 1; }
done
if [ "${1:-}" = --check ]; then
  for spec in dpu-agent driver; do
    if ! cmp -s "$out/$spec.ts" "openapi/generated/$spec.ts"; then
      echo "openapi/generated/$spec.ts is stale: run 'npm run gen' and commit the result" >&2
      exit 1
    fi
  done
fi

#!/bin/bash
# Runs every scenario 3 times (under the shared heavy lock, one run at a time) into results.jsonl.
cd "$(dirname "$0")"
: > results.jsonl
for rep in 1 2 3; do
  # A: 1 seeder + 4 leechers + origin as web seed, origin uncapped
  flock /tmp/heavy.lock node run-wt.mjs 4 1 0 -1 rarest 1 | sed 's/^{/{"scenario":"A seeder+webseed",/' >> results.jsonl
  flock /tmp/heavy.lock node run-http.mjs 4 1 0 -1 4 | sed 's/^{/{"scenario":"A seeder+webseed",/' >> results.jsonl
  # B: no seeder, 4 leechers start together, origin is the only full copy
  flock /tmp/heavy.lock node run-wt.mjs 4 0 0 -1 rarest 1 | sed 's/^{/{"scenario":"B no seeder",/' >> results.jsonl
  flock /tmp/heavy.lock node run-http.mjs 4 0 0 -1 4 | sed 's/^{/{"scenario":"B no seeder",/' >> results.jsonl
  # C: WebTorrent peers only (seeder, no web seed): the BitTorrent wire's own CPU cost
  flock /tmp/heavy.lock node run-wt.mjs 4 1 0 -1 rarest 0 | sed 's/^{/{"scenario":"C seeder, no webseed",/' >> results.jsonl
done

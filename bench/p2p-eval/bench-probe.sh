#!/bin/bash
# On-demand region latency: 1 seeder + 1 leecher, origin capped at 32 MiB/s, every node's upload capped at 32 MiB/s;
# the leecher asks for 8 random missing regions, one a second, as host reads would.
cd "$(dirname "$0")"
: > probe.jsonl
PROBE=1 flock /tmp/heavy.lock node run-wt.mjs 1 1 33554432 33554432 rarest 1 | sed 's/^{/{"scenario":"P probe capped",/' >> probe.jsonl
PROBE=1 flock /tmp/heavy.lock node run-http.mjs 1 1 33554432 33554432 4 | sed 's/^{/{"scenario":"P probe capped",/' >> probe.jsonl

/**
 * The fleet's plots for docs/fleet.md, from the results the network-namespace fleet bench
 * wrote (bench/results/fleet-*.json; no run here): how long until all N nodes are local,
 * over one node's time, by fleet size and link rate, peers on and off; and when each node
 * of the newest 100 Mbit/s peers-on run was local. Run by `bench/fleet.ts --netns` after
 * each run, or alone: `node dist/bench/fleet-plots.js`. Runs with a lying seed (--liar)
 * are left out.
 */
import fs from 'node:fs';
import path from 'node:path';
import { plot, REPO, RESULTS_DIR, type Series } from './lib/common.js';

interface FleetRun {
  nodes: number;
  peers: boolean;
  all_local_s: number;
  node_local_s?: number[];
}

interface FleetResults {
  file: string;
  netns: boolean;
  liar?: boolean;
  node_rate: number;
  runs: FleetRun[];
}

function mbit(r: FleetResults): number {
  return Math.round((r.node_rate * 8) / 1e6);
}

/** The newest netns results, newest first (file names sort by time). */
function netnsResults(): FleetResults[] {
  return fs
    .readdirSync(RESULTS_DIR)
    .filter((f) => /^fleet-\d{4}-.*\.json$/.test(f))
    .sort()
    .reverse()
    .map((f) => ({ ...(JSON.parse(fs.readFileSync(path.join(RESULTS_DIR, f), 'utf8')) as Omit<FleetResults, 'file'>), file: f }))
    .filter((r) => r.netns && !r.liar);
}

/** Per fleet size, the newest figure (all local ÷ one node's) of that rate and mode, each run over its own one-node reference. */
function ratios(all: FleetResults[], rate: number, peers: boolean): [number, number][] {
  const out = new Map<number, number>();
  for (const r of all.filter((x) => mbit(x) === rate)) {
    const single = r.runs.find((x) => x.nodes === 1)?.all_local_s;
    if (!single) continue;
    for (const x of r.runs) if (x.nodes > 1 && x.peers === peers && !out.has(x.nodes)) out.set(x.nodes, x.all_local_s / single);
  }
  return [...out.entries()].sort((a, b) => a[0] - b[0]);
}

export function fleetPlots(): string[] {
  const all = netnsResults();
  if (all.length === 0) return [];
  const done: string[] = [];
  const rates = [...new Set(all.map(mbit))].sort((a, b) => b - a);
  const series: Series[] = [];
  for (const rate of rates) {
    for (const peers of [true, false]) {
      const pts = ratios(all, rate, peers);
      if (pts.length > 0) series.push({ title: `peers ${peers ? 'on' : 'off'}, ${rate} Mbit/s links`, points: [[1, 1], ...pts] });
    }
  }
  const most = Math.max(...series.flatMap((s) => s.points.map((p) => p[0])));
  series.push({ title: 'goal: 3x one node', points: [[1, 3], [most, 3]], style: 'lines dashtype 2' });
  const a = plot({
    file: 'bench-fleet-all-local.png',
    title: 'All N nodes local, over one node alone (network namespaces)',
    xlabel: 'nodes',
    ylabel: 'x one node',
    series,
    logx: true,
    logy: true,
    extra: [`set xrange [1:${most}]`, 'set xtics (1, 2, 4, 8, 16, 32)', 'set ytics (1, 2, 3, 4, 8, 16, 32)'],
  });
  if (a) done.push(a);

  const newest = all.find((r) => mbit(r) === 100 && r.runs.some((x) => x.peers && (x.node_local_s?.length ?? 0) > 1));
  if (newest) {
    const per: Series[] = newest.runs
      .filter((x) => x.peers && (x.node_local_s?.length ?? 0) > 1)
      .sort((x, y) => x.nodes - y.nodes)
      .map((x) => ({ title: `${x.nodes} nodes, peers on`, points: [...x.node_local_s!].sort((p, q) => p - q).map((s, i) => [(i + 1) / x.nodes, s] as [number, number]) }));
    const single = newest.runs.find((x) => x.nodes === 1)?.all_local_s;
    if (single) per.push({ title: 'one node alone', points: [[0, single], [1, single]], style: 'lines dashtype 2' });
    const b = plot({ file: 'bench-fleet-node-local.png', title: 'When each node was local (100 Mbit/s links)', xlabel: 'share of the fleet local', ylabel: 's since the first create', series: per });
    if (b) done.push(b);
  }
  return done;
}

if (import.meta.url === `file://${process.argv[1]}`) {
  for (const f of fleetPlots()) console.log(path.relative(REPO, path.join(REPO, f)));
}

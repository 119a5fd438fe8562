/**
 * Host reads while the agent serves peers (issue #15: "peers never slow the host's own
 * reads"): fio's nbd engine reads a complete disk's export while a load of peer reads
 * (bench/lib/peer-load.ts: GET …/image with one Range and the peer token, as peer agents
 * send them) pulls the same disk's regions as fast as the agent answers them.
 *
 * Why it is shaped this way:
 * - The agent is pinned to core 0, fio and the peer load to core 1 (taskset), the load at
 *   SCHED_IDLE (chrt --idle) so it runs only when fio does not: the agent has a core of its
 *   own, as on a DPU, and what the peer load costs the host is what the agent's own
 *   scheduling lets through, not CPU the load took from fio.
 * - Serving is unpaced (peers.serve_bandwidth 0) over loopback: the worst case, a peer
 *   load limited only by the agent's CPU, as a DPU's 25–400 Gbit/s uplink would allow.
 * - Each variant is an agent daemon with its own disk (its config is the variant); the
 *   host's reads hit the page cache, so what differs is the agent. Runs are interleaved
 *   (round → workload → variant, with peers off first on every agent) and medians taken.
 *
 * Run it under the machine's heavy-work lock: `flock /tmp/heavy.lock node dist/bench/peer-serve.js`.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { Manifest } from '../image-access/src/manifest.js';
import { AgentClient, type Disk } from '../openapi/clients/agent-client.js';
import { FileSource } from '../tests/helpers/qcow2-images.js';
import { TestOrigin } from '../tests/helpers/origin.js';
import { agentDaemon, type ServiceProcess, TOKEN } from '../tests/helpers/services.js';
import {
  BENCH_FLAGS,
  type BenchFlags,
  MiB,
  REPO,
  benchFlags,
  commandLine,
  cpuSeconds,
  describeMachine,
  fmtNum,
  machineInfo,
  makeRandomImage,
  markdownTable,
  median,
  onCleanup,
  parseSizeArg,
  positive,
  removeAtEnd,
  runMain,
  sleep,
  track,
  updateDocSection,
  writeResults,
} from './lib/common.js';

const SECTION = '## Host reads while the agent serves peers (fio nbd engine, peer load on loopback)';
const PEER_TOKEN = 'peer-serve-bench-token-0123456789';

const USAGE = `Usage: node dist/bench/peer-serve.js [options]   (run it under: flock /tmp/heavy.lock …)

  --runtime S       seconds per fio run (default 8)
  --reps N          rounds (default 3)
  --size SIZE       image size (default 256M)
  --range SIZE      bytes per peer read (default 2M: the runs a disk waiting for peers asks)
  --concurrency N   peer reads in flight (default 4: an agent's 2 serving slots and 2 queued)
  --workloads LIST  comma-separated, of randread-4k-qd1, randread-64k-qd4, none (default all)
  --quick           2 s × 1 round; docs/benchmarks.md is left alone unless --docs
  --workdir DIR, --keep, --docs, --no-docs, --help`;

/** The bench's own flags, with the common ones (--quick, --workdir, --keep, --docs). */
interface Options extends BenchFlags {
  runtime: number;
  reps: number;
  size: number;
  range: number;
  concurrency: number;
  workloads: Workload[];
}

function parseOptions(argv: string[]): Options {
  const { values: v } = parseArgs({
    args: argv,
    strict: true,
    options: { ...BENCH_FLAGS, runtime: { type: 'string' }, reps: { type: 'string' }, size: { type: 'string' }, range: { type: 'string' }, concurrency: { type: 'string' }, workloads: { type: 'string' } },
  });
  const common = benchFlags(v, USAGE);
  const size = parseSizeArg(v.size ?? '256M', '--size');
  const range = parseSizeArg(v.range ?? '2M', '--range');
  if (size < 16 * MiB || size % MiB !== 0) throw new Error('--size must be a whole number of MiB, at least 16M');
  if (range % MiB !== 0 || range > 16 * MiB || range > size) throw new Error('--range must be whole MiB (regions), at most 16M (what an agent answers) and the image');
  return {
    ...common,
    runtime: positive('runtime', v.runtime, common.quick ? 2 : 8),
    reps: Math.round(positive('reps', v.reps, common.quick ? 1 : 3)),
    size,
    range,
    concurrency: Math.round(positive('concurrency', v.concurrency, 4, true)),
    workloads: pickWorkloads(v.workloads),
  };
}

function pickWorkloads(list: string | undefined): Workload[] {
  if (list === undefined) return WORKLOADS;
  const ids = list.split(',');
  const unknown = ids.filter((id) => !WORKLOADS.some((w) => w.id === id));
  if (unknown.length > 0) throw new Error(`--workloads: ${unknown.join(', ')} unknown; choose from ${WORKLOADS.map((w) => w.id).join(', ')}`);
  return WORKLOADS.filter((w) => ids.includes(w.id));
}

interface Workload {
  id: string;
  label: string;
  bs: string;
  iodepth: number;
}

const WORKLOADS: Workload[] = [
  { id: 'randread-4k-qd1', label: '4K random read QD1', bs: '4k', iodepth: 1 },
  { id: 'randread-64k-qd4', label: '64K random read QD4', bs: '64k', iodepth: 4 },
  // The host idle: what each agent serves peers when nothing holds it back.
  { id: 'none', label: 'none (host idle)', bs: '', iodepth: 0 },
];

/** An agent config under test: its peers settings. */
interface Variant {
  name: string;
  label: string;
  peers: Record<string, unknown>;
}

const VARIANTS: Variant[] = [
  { name: 'unyielding', label: 'serving peers, host_yield_ms 0', peers: { serve_bandwidth: 0, host_yield_ms: 0 } },
  { name: 'yielding', label: 'serving peers, host_yield_ms 10 (default)', peers: { serve_bandwidth: 0, host_yield_ms: 10 } },
];

interface RunRecord {
  round: number;
  workload: string;
  variant: string;
  /** false: no peer load during the run (the reference). */
  load: boolean;
  iops: number;
  clatUs: { p50: number; p99: number; p999: number };
  agentCpuS: number;
  /** Peer bytes served during the fio run, MB/s, and the load's refusals. */
  peerMBps: number;
  peerBusy: number;
}

interface Setup {
  variant: Variant;
  agent: ServiceProcess;
  disk: Disk;
}

async function setUp(dir: string, origin: TestOrigin, image: string, size: number, variant: Variant): Promise<Setup> {
  const agent = await agentDaemon({ dir: path.join(dir, variant.name), wrap: ['taskset', '-c', '0'], extra: { peers: variant.peers, log_level: 'warn' } });
  await agent.start();
  onCleanup(() => agent.stop().then(() => undefined));
  const api = new AgentClient({ baseUrl: agent.url, token: TOKEN });
  await api.createDisk({ id: 'seed', source: { url: origin.url, identity: 'peer-serve-image' }, target: { path: path.join(dir, variant.name, 'targets', 'seed.raw') }, region_size: MiB, peers: { token: PEER_TOKEN }, hydration: { paused: true } });
  // Verified regions only are served to peers: the manifest before the copy.
  await api.setManifest('seed', (await Manifest.build(new FileSource(image), { regionSize: MiB })).encode());
  await api.updateHydration('seed', { paused: false });
  for (;;) {
    const d = await api.getDisk('seed');
    if (d.state === 'failed') throw new Error(`${variant.name}: the disk failed: ${d.last_error ?? ''}`);
    if (d.regions.local === d.regions.total && d.verified) {
      if (d.size !== size) throw new Error(`${variant.name}: the disk is ${d.size} bytes, not ${size}`);
      return { variant, agent, disk: d };
    }
    await sleep(200);
  }
}

/** Starts the peer load pinned to core 1 and resolves once its first answer is in. */
async function startLoad(s: Setup, o: Options): Promise<{ child: ChildProcess; snapshot: () => Promise<LoadCounts>; stop: () => Promise<LoadCounts> }> {
  const script = path.join(REPO, 'dist/bench/lib/peer-load.js');
  // SCHED_IDLE: the load runs on core 1 only when fio does not need it, so what the host
  // loses is what the agent lets through, not CPU the load took from fio.
  const child = track(spawn('chrt', ['--idle', '0', 'taskset', '-c', '1', process.execPath, script, s.agent.url, 'seed', PEER_TOKEN, String(o.size), String(o.range), String(o.concurrency)], { stdio: ['ignore', 'pipe', 'pipe'] }));
  let err = '';
  child.stderr!.setEncoding('utf8').on('data', (d: string) => (err += d));
  const lines: string[] = [];
  const waiters: ((l: string) => void)[] = [];
  let buf = '';
  child.stdout!.setEncoding('utf8').on('data', (d: string) => {
    buf += d;
    let i;
    while ((i = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, i);
      buf = buf.slice(i + 1);
      const w = waiters.shift();
      if (w) w(line);
      else lines.push(line);
    }
  });
  const next = (): Promise<string> =>
    lines.length > 0
      ? Promise.resolve(lines.shift()!)
      : new Promise((resolve, reject) => {
          waiters.push(resolve);
          child.once('exit', (code) => reject(new Error(`the peer load exited ${code}: ${err.slice(-1000)}`)));
        });
  const first = await next();
  if (!first.includes('flowing')) throw new Error(`the peer load said ${first}`);
  return {
    child,
    snapshot: async () => {
      child.kill('SIGUSR2');
      return JSON.parse(await next()) as LoadCounts;
    },
    stop: async () => {
      child.kill('SIGTERM');
      return JSON.parse(await next()) as LoadCounts;
    },
  };
}

interface LoadCounts {
  bytes: number;
  answers: number;
  busy: number;
  refused: number;
  seconds: number;
}

async function runFio(w: Workload, s: Setup, o: Options, round: number, load: boolean): Promise<RunRecord> {
  const l = load ? await startLoad(s, o) : null;
  const before = l ? await l.snapshot() : null;
  const cpu0 = cpuSeconds(s.agent.child!.pid!, s.variant.name);
  if (w.id === 'none') {
    await sleep(o.runtime * 1000);
    const cpu1 = cpuSeconds(s.agent.child!.pid!, s.variant.name);
    const after = l ? await l.stop() : null;
    const served = before && after ? (after.bytes - before.bytes) / 1e6 / (after.seconds - before.seconds) : 0;
    return { round, workload: w.id, variant: s.variant.name, load, iops: NaN, clatUs: { p50: NaN, p99: NaN, p999: NaN }, agentCpuS: cpu1 - cpu0, peerMBps: served, peerBusy: before && after ? after.busy - before.busy : 0 };
  }
  const args = ['-c', '1', 'fio', '--name=peer-serve', '--ioengine=nbd', `--uri=${s.disk.export.uri}`, '--rw=randread', `--bs=${w.bs}`, `--iodepth=${w.iodepth}`, `--runtime=${o.runtime}`, '--time_based', '--norandommap', '--output-format=json'];
  const child = track(spawn('taskset', args, { stdio: ['ignore', 'pipe', 'pipe'] }));
  let out = '';
  let err = '';
  child.stdout!.setEncoding('utf8').on('data', (d: string) => (out += d));
  child.stderr!.setEncoding('utf8').on('data', (d: string) => (err += d));
  const code = await new Promise<number | null>((resolve, reject) => {
    child.once('error', reject);
    child.once('exit', (c) => resolve(c));
  });
  const cpu1 = cpuSeconds(s.agent.child!.pid!, s.variant.name);
  const after = l ? await l.stop() : null;
  if (code !== 0) throw new Error(`fio ${w.id} on ${s.variant.name} exited ${code}: ${err.slice(-2000)}`);
  const doc = JSON.parse(out.slice(out.indexOf('{'), out.lastIndexOf('}') + 1)) as { jobs: { read: { iops: number; total_ios: number; clat_ns: { percentile: Record<string, number> } }; error: number }[] };
  const job = doc.jobs[0]!;
  if (job.error !== 0 || job.read.total_ios === 0) throw new Error(`fio ${w.id} on ${s.variant.name}: error ${job.error}, ${job.read.total_ios} ops`);
  const pct = job.read.clat_ns.percentile;
  const served = before && after ? (after.bytes - before.bytes) / 1e6 / (after.seconds - before.seconds) : 0;
  return {
    round,
    workload: w.id,
    variant: s.variant.name,
    load,
    iops: job.read.iops,
    clatUs: { p50: pct['50.000000']! / 1000, p99: pct['99.000000']! / 1000, p999: pct['99.900000']! / 1000 },
    agentCpuS: cpu1 - cpu0,
    peerMBps: served,
    peerBusy: before && after ? after.busy - before.busy : 0,
  };
}

interface Row {
  workload: Workload;
  variant: string;
  load: boolean;
  iops: number;
  p50: number;
  p99: number;
  p999: number;
  peerMBps: number;
  cpuShare: number;
}

function summarize(runs: RunRecord[], o: Options): Row[] {
  const rows: Row[] = [];
  for (const w of o.workloads) {
    const cases: { variant: string; load: boolean }[] = [{ variant: VARIANTS[0]!.name, load: false }, ...VARIANTS.map((v) => ({ variant: v.name, load: true }))];
    for (const c of cases) {
      // The reference (no peer load) from every agent: the same code path without peers.
      const mine = runs.filter((r) => r.workload === w.id && r.load === c.load && (c.load ? r.variant === c.variant : true));
      if (mine.length === 0) continue;
      rows.push({
        workload: w,
        variant: c.load ? c.variant : 'no peer load',
        load: c.load,
        iops: median(mine.map((r) => r.iops)),
        p50: median(mine.map((r) => r.clatUs.p50)),
        p99: median(mine.map((r) => r.clatUs.p99)),
        p999: median(mine.map((r) => r.clatUs.p999)),
        peerMBps: median(mine.map((r) => r.peerMBps)),
        cpuShare: median(mine.map((r) => r.agentCpuS / o.runtime)),
      });
    }
  }
  return rows;
}

function render(rows: Row[], o: Options, machine: string, resultsFile: string): string {
  const ref = new Map(rows.filter((r) => !r.load).map((r) => [r.workload.id, r]));
  const table = markdownTable(
    ['host workload', 'agent', 'IOPS', 'p50 µs', 'p99 µs', 'p99.9 µs', 'p99 vs no load', 'peers served MB/s', "agent's core"],
    ['l', 'l', 'r', 'r', 'r', 'r', 'r', 'r', 'r'],
    rows.map((r) => {
      const base = ref.get(r.workload.id);
      const host = (n: number): string => (Number.isNaN(n) ? '—' : fmtNum(n, 0));
      return [r.workload.label, r.load ? VARIANTS.find((v) => v.name === r.variant)!.label : 'no peer load', host(r.iops), host(r.p50), host(r.p99), host(r.p999), base && r.load ? `${(r.p99 / base.p99).toFixed(2)}×` : '—', r.load ? fmtNum(r.peerMBps, 0) : '—', `${Math.round(r.cpuShare * 100)}%`];
    }),
  );
  return `${SECTION}

\`${commandLine()}\` — ${machine}; results in \`${resultsFile}\`.

fio (nbd engine, random reads of a complete ${o.size / MiB} MiB disk, ${o.runtime} s per run, medians of ${o.reps} interleaved rounds) on core 1, with and without a load of peer reads on core 1 too (${o.concurrency} in flight, ${o.range / MiB} MiB each, unpaced: \`peers.serve_bandwidth\` 0); the agent alone on core 0. "agent's core": the agent's CPU-seconds over the run's seconds.

${table}
`;
}

async function main(): Promise<void> {
  const o = parseOptions(process.argv.slice(2));
  const dir = o.workdir ?? fs.mkdtempSync(path.join(os.tmpdir(), 'peer-serve-'));
  if (!o.keep) removeAtEnd(dir);
  const image = path.join(dir, 'image.raw');
  makeRandomImage(image, o.size, 7);
  const origin = new TestOrigin({ file: image });
  await origin.start();
  onCleanup(() => origin.stop());
  const machine = await machineInfo(['fio']);
  const setups: Setup[] = [];
  for (const v of VARIANTS) setups.push(await setUp(dir, origin, image, o.size, v));
  const runs: RunRecord[] = [];
  for (let round = 0; round < o.reps; round++) {
    for (const w of o.workloads) {
      const order = [...setups.slice(round % setups.length), ...setups.slice(0, round % setups.length)];
      for (const s of order) {
        for (const load of w.id === 'none' ? [true] : [false, true]) {
          const r = await runFio(w, s, o, round, load);
          runs.push(r);
          console.log(`round ${round + 1}/${o.reps} ${w.id} ${s.variant.name} ${load ? 'load' : 'idle'}: ${fmtNum(r.iops, 0)} IOPS p50 ${fmtNum(r.clatUs.p50, 0)} µs p99 ${fmtNum(r.clatUs.p99, 0)} µs; peers ${fmtNum(r.peerMBps, 0)} MB/s (${r.peerBusy} busy); agent ${fmtNum(r.agentCpuS, 2)} s`);
        }
      }
    }
  }
  const rows = summarize(runs, o);
  const date = new Date();
  const resultsFile = writeResults('peer-serve', date, { command: commandLine(), machine, options: o, variants: VARIANTS, rows: rows.map((r) => ({ ...r, workload: r.workload.id })), runs });
  const section = render(rows, o, describeMachine(machine), resultsFile);
  console.log(section);
  if (o.docs) updateDocSection(SECTION, section);
}

runMain('peer-serve', main);

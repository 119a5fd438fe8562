/**
 * Deploy modes: how long a bare-metal host takes from "deploy" to a booted OS, and how fast
 * its disk is while and after the image arrives, for the four ways of giving it a disk —
 * on the same emulated link, from the same origin, with the same boot path.
 *
 *   streaming     `dpu-agent stream` from the origin URL; QEMU boots from its export at once
 *                 while the rest of the image is copied in the background.
 *   copy-first    what Ironic's `direct` deploy does: the whole image is downloaded to the
 *                 local disk (curl, then fsync), then QEMU boots from the local copy.
 *   network-only  the host reads the origin for ever: `nbdkit curl` with no cache.
 *   local         the baseline: the image already on the local disk (page cache dropped).
 *
 * Why it is shaped this way:
 * - One boot path for all: every mode ends in an NBD export on a unix socket (the agent's,
 *   or `nbdkit file` / `nbdkit curl`) that QEMU (TCG, q35, NVMe disk) boots from, so the
 *   differences are where the bytes come from and when, never the emulated hardware.
 * - The origin is nginx-light inside the link's network namespace, so every byte the host
 *   side gets crosses the veth pair shaped by `tc tbf`; nginx sends with sendfile and does
 *   not itself cap the link (a Node origin does near 1 Gbit/s). The veth's rx_bytes is what
 *   crossed the wire, headers included.
 * - The clock starts when the mode starts (agent spawned / curl spawned / nbdkit spawned),
 *   and stops when the boot marker appears on QEMU's serial console. Readiness of an export
 *   is polled every 10 ms by reading its NBD greeting, without spawning a client, so the
 *   poll adds the same few ms to every mode.
 * - The image is the boot fixture padded with incompressible bytes (bench/lib/
 *   boot-image-padded.ts), built once per size and run, so every mode has the same bytes
 *   to move and none can skip zeros.
 * - Mode order is rotated every rep so slow drifts of the shared machine fall on all modes.
 *   QEMU is stopped by PID at the marker in timing runs; files written by a run are deleted
 *   right after it (their dirty pages die with them instead of being written back during
 *   the next run).
 * - I/O runs are separate from timing runs (fio would otherwise slow the boot it measures)
 *   and use the smallest size only: each boots the host, then at the marker runs fio's nbd
 *   engine against the same export. "During" hydration needs a streaming deploy per
 *   workload, because at 1 Gbit/s a 1 GiB image has only a few seconds of hydration left at
 *   the marker; the sequential read starts at the hydration front (what the host has not
 *   got yet). "After" runs drop the page cache of the export's local file first, so they
 *   read the disk like a host whose RAM does not hold its image.
 *
 * Run it under the machine's heavy-work lock: `flock /tmp/heavy.lock node dist/bench/deploy-modes.js`.
 */
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { parseArgs } from 'node:util';
import type { ChildProcess } from 'node:child_process';
import { EmulatedLink } from '../lab/netns.js';
import { AgentProcess } from '../tests/helpers/agent.js';
import { run } from '../tests/helpers/run.js';
import { startNginxOrigin } from './lib/nginx-origin.js';
import { buildPaddedBootImage } from './lib/boot-image-padded.js';
import { startQemuHost } from './lib/boot-qemu.js';
import {
  BENCH_FLAGS,
  DOC,
  GiB,
  MiB,
  benchFlags,
  parseRateArg,
  parseSizeArg,
  positive,
  REPO,
  commandLine,
  cpuSeconds,
  describeMachine,
  dropFileCache,
  flushFile,
  fmtBytes,
  fmtNum,
  machineInfo,
  markdownTable,
  median,
  onCleanup,
  plot,
  ratio,
  removeAtEnd,
  runMain,
  sleep,
  spawnTracked,
  stopChild,
  track,
  updateDocSection,
  writeResults,
  type MachineInfo,
} from './lib/common.js';

const SECTION = '## Deploy modes: streaming vs copy-first vs network-only';

// ---------------------------------------------------------------- options

const USAGE = `Usage: node dist/bench/deploy-modes.js [options]   (run it under: flock /tmp/heavy.lock …)

Boots a QEMU host from an NBD disk deployed four ways over one emulated link (streaming,
copy-first, network-only, local disk) and times deploy → boot marker; then measures the
booted host's disk with fio during and after hydration (smallest size only).

  --sizes LIST      image sizes, e.g. 1G,8G (default 1G,8G; each ≥ 64M, whole MiB)
  --link RATE       link rate, e.g. 1gbit, 10gbit, 500mbit (default 1gbit)
  --reps N          timing runs per mode and size; tables show medians (default 3)
  --io-runtime S    seconds per fio job (default 3)
  --link-index N    emulated link index, 50–57 (default 50)
  --agent-args STR  extra \`dpu-agent stream\` flags for the streaming mode, space-separated
                    (e.g. "--hydrate-connections 1"); shown in the report
  --no-io           skip the fio part
  --quick           smoke run: 256M, 1 rep, 2 s fio jobs; docs/ untouched unless --docs
  --workdir DIR     where images, copies and sockets go (default: a fresh dir in the OS temp dir)
  --keep            keep the work directory
  --docs            update docs/benchmarks.md and the plots even with --quick
  --no-docs         do not touch docs/
  --help`;

interface Options {
  sizes: number[];
  linkLabel: string;
  /** Bytes per second. */
  linkRate: number;
  reps: number;
  ioRuntime: number;
  linkIndex: number;
  agentArgs: string[];
  io: boolean;
  quick: boolean;
  workdir: string | undefined;
  keep: boolean;
  docs: boolean;
}

function parseOptions(argv: string[]): Options {
  const { values: v } = parseArgs({
    args: argv,
    strict: true,
    options: {
      ...BENCH_FLAGS,
      sizes: { type: 'string' },
      link: { type: 'string' },
      reps: { type: 'string' },
      'io-runtime': { type: 'string' },
      'link-index': { type: 'string' },
      'agent-args': { type: 'string' },
      'no-io': { type: 'boolean' },
    },
  });
  const common = benchFlags(v, USAGE);
  const quick = common.quick;
  const num = (name: string, s: string | undefined, dflt: number): number => positive(name, s, dflt);
  const linkLabel = v.link ?? '1gbit';
  const linkIndex = Math.round(num('link-index', v['link-index'], 50));
  if (linkIndex < 50 || linkIndex > 57) throw new Error('--link-index must be 50–57 (other indexes belong to other users of lab/netns.ts)');
  const sizes = (v.sizes ?? (quick ? '256M' : '1G,8G')).split(',').map((s) => parseSize(s));
  return {
    sizes: [...new Set(sizes)].sort((a, b) => a - b),
    linkLabel,
    linkRate: parseRateArg(linkLabel, '--link'),
    reps: Math.round(num('reps', v.reps, quick ? 1 : 3)),
    ioRuntime: num('io-runtime', v['io-runtime'], quick ? 2 : 3),
    linkIndex,
    agentArgs: (v['agent-args'] ?? '').split(/\s+/).filter(Boolean),
    io: v['no-io'] !== true,
    ...common,
  };
}

function parseSize(s: string): number {
  const n = parseSizeArg(s, '--sizes');
  if (n < 64 * MiB || n % MiB !== 0) throw new Error(`--sizes "${s}": a whole number of MiB, at least 64M (the boot fixture itself)`);
  return n;
}

function sizeLabel(n: number): string {
  return n % GiB === 0 ? `${n / GiB} GiB` : `${n / MiB} MiB`;
}

// ---------------------------------------------------------------- modes and records

const MODES = ['streaming', 'copy-first', 'network-only', 'local'] as const;
type Mode = (typeof MODES)[number];

const MODE_HOW: Record<Mode, string> = {
  streaming: '`dpu-agent stream --source URL --target FILE --state DIR --listen unix:SOCK` (defaults otherwise)',
  'copy-first': '`curl -sS --fail -o FILE URL`, fsync, then `nbdkit -f -U SOCK file FILE`',
  'network-only': '`nbdkit -f -U SOCK curl url=URL` (no cache filter)',
  local: '`nbdkit -f -U SOCK file IMAGE` on the image already on the local disk, page cache dropped first',
};

interface BootRun {
  size: number;
  rep: number;
  mode: Mode;
  /** Deploy start → boot marker, seconds. */
  toMarkerS: number;
  /** Deploy start → QEMU spawned (export answering), seconds. */
  toQemuS: number;
  /** QEMU spawned → boot marker, seconds. */
  qemuToMarkerS: number;
  /** Bytes received on the host side of the link from deploy start to the marker. */
  wireAtMarker: number;
  /** … to the end of the run (streaming: hydration complete). */
  wireTotal: number;
  /** Deploy start → the whole image local (streaming: `complete`; copy-first: download fsynced). */
  imageLocalS: number | null;
  /** Streaming: fraction of regions local when the marker appeared. */
  hydratedAtMarker: number | null;
  /** CPU seconds (utime+stime) QEMU used from spawn to the marker: the boot's work, whatever the contention. */
  qemuCpuS: number;
  /** Streaming: CPU seconds the agent used from spawn to the marker (it shares the 2 cores with QEMU here). */
  agentCpuS: number | null;
  /** 1-minute load average when the run started (the machine is shared). */
  load1: number;
}

const IO_JOBS = [
  { id: 'randread-4k-qd1', label: '4K random read QD1', rw: 'randread', bs: '4k', iodepth: 1, metric: 'IOPS' },
  { id: 'read-1m-qd8', label: '1 MiB sequential read QD8', rw: 'read', bs: '1M', iodepth: 8, metric: 'MB/s' },
] as const;
type IoJob = (typeof IO_JOBS)[number];
type IoPhase = 'during' | 'after';

interface IoRun {
  size: number;
  rep: number;
  mode: Mode;
  phase: IoPhase;
  job: IoJob['id'];
  iops: number;
  mbps: number;
  /** Where the job started reading (the sequential read during hydration starts at the front). */
  offset: number;
  /** Streaming: regions local (fraction) before and after the job; whether hydration ended during it. */
  hydratedBefore: number | null;
  hydratedAfter: number | null;
  completedDuringJob: boolean | null;
}

// ---------------------------------------------------------------- the lab

interface Lab {
  opts: Options;
  dir: string;
  link: EmulatedLink;
  /** URL of the image of `size` at the origin. */
  url(size: number): string;
  image(size: number): string;
  rx(): number;
  seq: number;
}

/**
 * Waits until `socket` answers with an NBD greeting ("NBDMAGIC"), polling every 10 ms;
 * fails as soon as the server process dies.
 */
async function waitGreeting(socket: string, child: ChildProcess, name: string, timeoutMs = 60_000): Promise<void> {
  const deadline = performance.now() + timeoutMs;
  let last = '';
  while (performance.now() < deadline) {
    if (child.exitCode !== null || child.signalCode !== null) throw new Error(`${name} exited (${child.exitCode ?? child.signalCode}) before its export answered`);
    if (fs.existsSync(socket)) {
      const ok = await new Promise<boolean>((resolve) => {
        const s = net.connect(socket);
        let got = Buffer.alloc(0);
        const done = (v: boolean): void => {
          s.destroy();
          resolve(v);
        };
        s.on('data', (d: Buffer) => {
          got = Buffer.concat([got, d]);
          if (got.length >= 8) done(got.subarray(0, 8).toString('latin1') === 'NBDMAGIC');
        });
        s.on('error', (e) => {
          last = e.message;
          done(false);
        });
        s.on('close', () => done(false));
      });
      if (ok) return;
    }
    await sleep(10);
  }
  throw new Error(`${name}: no NBD greeting on ${socket} within ${timeoutMs / 1000} s (${last})`);
}

// ---------------------------------------------------------------- one deployment

interface Deployment {
  mode: Mode;
  socket: string;
  /** performance.now() at deploy start. */
  t0: number;
  /** The local file the export reads (null for network-only; the agent's target for streaming). */
  localFile: string | null;
  agent: AgentProcess | null;
  /** copy-first: when the download was durable. */
  downloadedAt: number | null;
  stop(): Promise<void>;
}

function nbdUri(socket: string): string {
  return `nbd+unix:///?socket=${socket}`;
}

async function deploy(lab: Lab, mode: Mode, size: number): Promise<Deployment> {
  const id = `${mode}-${++lab.seq}`;
  const socket = path.join(lab.dir, `${id}.sock`);
  const files: string[] = [socket];
  const remove = (): void => {
    for (const f of files) fs.rmSync(f, { recursive: true, force: true });
  };
  const url = lab.url(size);

  if (mode === 'local') {
    // The baseline boots from a disk, not from RAM: the image's cached pages go first.
    flushFile(lab.image(size));
    dropFileCache(lab.image(size));
  }

  const t0 = performance.now();
  switch (mode) {
    case 'streaming': {
      const target = path.join(lab.dir, `${id}.target`);
      const state = path.join(lab.dir, `${id}.state`);
      files.push(target, state);
      const agent = new AgentProcess({ source: url, target, state, socket, extra: lab.opts.agentArgs });
      track(agent.child);
      await waitGreeting(socket, agent.child, 'dpu-agent');
      return {
        mode, socket, t0, localFile: target, agent, downloadedAt: null,
        stop: async () => {
          await stopChild(agent.child, 10_000);
          remove();
        },
      };
    }
    case 'copy-first': {
      const copy = path.join(lab.dir, `${id}.raw`);
      files.push(copy);
      const curl = spawnTracked('curl', ['-sS', '--fail', '-o', copy, url]);
      const code = await new Promise<number | null>((resolve) => curl.child.once('exit', (c) => resolve(c)));
      if (code !== 0) throw new Error(`curl ${url} failed (${code}): ${curl.stderr()}`);
      flushFile(copy);
      const downloadedAt = performance.now();
      if (fs.statSync(copy).size !== size) throw new Error(`curl wrote ${fs.statSync(copy).size} bytes, expected ${size}`);
      const nbd = spawnTracked('nbdkit', ['-f', '-U', socket, 'file', copy]);
      await waitGreeting(socket, nbd.child, 'nbdkit file');
      return { mode, socket, t0, localFile: copy, agent: null, downloadedAt, stop: async () => { await stopChild(nbd.child); remove(); } };
    }
    case 'network-only': {
      const nbd = spawnTracked('nbdkit', ['-f', '-U', socket, 'curl', `url=${url}`, 'timeout=60']);
      await waitGreeting(socket, nbd.child, 'nbdkit curl');
      return { mode, socket, t0, localFile: null, agent: null, downloadedAt: null, stop: async () => { await stopChild(nbd.child); remove(); } };
    }
    case 'local': {
      const nbd = spawnTracked('nbdkit', ['-f', '-U', socket, 'file', lab.image(size)]);
      await waitGreeting(socket, nbd.child, 'nbdkit file');
      return { mode, socket, t0, localFile: lab.image(size), agent: null, downloadedAt: null, stop: async () => { await stopChild(nbd.child); remove(); } };
    }
  }
}

function hydrated(agent: AgentProcess | null): number | null {
  if (!agent) return null;
  if (agent.events.some((e) => e.event === 'complete')) return 1;
  const p = agent.latestProgress();
  const local = p?.['regionsLocal'];
  const total = p?.['regionsTotal'];
  return typeof local === 'number' && typeof total === 'number' && total > 0 ? local / total : null;
}

/** Generous: the image at a quarter of the link rate, plus two minutes. */
function hydrationTimeoutMs(lab: Lab, size: number): number {
  return (size / lab.opts.linkRate) * 4000 + 120_000;
}

// ---------------------------------------------------------------- timing run

function load1(): number {
  return Number(fs.readFileSync('/proc/loadavg', 'utf8').split(' ')[0]);
}

async function bootRun(lab: Lab, mode: Mode, size: number, rep: number): Promise<BootRun> {
  const load = load1();
  const rx0 = lab.link.rxBytes();
  const d = await deploy(lab, mode, size);
  try {
    const host = startQemuHost(d.socket, { timeoutMs: 300_000 });
    const markerAt = await host.marker;
    const wireAtMarker = lab.link.rxBytes() - rx0;
    const hydratedAtMarker = hydrated(d.agent);
    const qemuCpuS = cpuSeconds(host.child.pid!, 'qemu');
    const agentCpuS = d.agent ? cpuSeconds(d.agent.child.pid!, 'dpu-agent') : null;
    await host.stop();
    let imageLocalS: number | null = d.downloadedAt !== null ? (d.downloadedAt - d.t0) / 1000 : null;
    if (d.agent) {
      await d.agent.complete(hydrationTimeoutMs(lab, size));
      imageLocalS = (performance.now() - d.t0) / 1000;
    }
    return {
      size, rep, mode,
      toMarkerS: (markerAt - d.t0) / 1000,
      toQemuS: (host.startedAt - d.t0) / 1000,
      qemuToMarkerS: (markerAt - host.startedAt) / 1000,
      wireAtMarker,
      wireTotal: lab.link.rxBytes() - rx0,
      imageLocalS,
      hydratedAtMarker,
      qemuCpuS,
      agentCpuS,
      load1: load,
    };
  } finally {
    await d.stop();
  }
}

// ---------------------------------------------------------------- I/O runs

async function runFio(uri: string, job: IoJob, runtimeS: number, offset: number): Promise<{ iops: number; mbps: number }> {
  const args = ['--name=j', '--ioengine=nbd', `--uri=${uri}`, `--rw=${job.rw}`, `--bs=${job.bs}`, `--iodepth=${job.iodepth}`, `--runtime=${runtimeS}`, '--time_based', '--output-format=json'];
  if (offset > 0) args.push(`--offset=${offset}`);
  const { child, stderr } = spawnTracked('fio', args, { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  child.stdout!.setEncoding('utf8').on('data', (d: string) => (out += d));
  const code = await new Promise<number | null>((resolve) => child.once('close', (c) => resolve(c)));
  if (code !== 0) throw new Error(`fio ${args.join(' ')} failed (${code}): ${stderr()}`);
  // The nbd engine prints a "connected to NBD server" line before the JSON.
  const j = JSON.parse(out.slice(out.indexOf('{'))) as { jobs: { error: number; read: { iops: number; bw_bytes: number } }[] };
  const r = j.jobs[0]!;
  if (r.error) throw new Error(`fio job error ${r.error}: ${stderr()}`);
  return { iops: r.read.iops, mbps: r.read.bw_bytes / 1e6 };
}

/**
 * Deploys and starts the host; unless `waitMarker` is false, returns once the host has
 * booted (it is still up, or powering off). `marker` resolves when the boot marker appears.
 */
async function bootedDeployment(lab: Lab, mode: Mode, size: number, waitMarker = true): Promise<{ d: Deployment; marker: Promise<number>; stopHost: () => Promise<void> }> {
  const d = await deploy(lab, mode, size);
  const host = startQemuHost(d.socket, { timeoutMs: 300_000 });
  try {
    if (waitMarker) await host.marker;
  } catch (err) {
    await host.stop();
    await d.stop();
    throw err;
  }
  return { d, marker: host.marker, stopHost: () => host.stop() };
}

async function ioJob(lab: Lab, d: Deployment, phase: IoPhase, job: IoJob, size: number, rep: number): Promise<IoRun> {
  const before = hydrated(d.agent);
  // During hydration the sequential read starts at the hydration front: the data the host
  // does not have yet (reading from 0 would only re-read what already arrived).
  const offset = phase === 'during' && job.rw === 'read' && before !== null ? Math.floor((before * size) / MiB) * MiB : 0;
  const r = await runFio(nbdUri(d.socket), job, lab.opts.ioRuntime, offset >= size ? 0 : offset);
  const after = hydrated(d.agent);
  const run: IoRun = {
    size, rep, mode: d.mode, phase, job: job.id, ...r, offset,
    hydratedBefore: before,
    hydratedAfter: after,
    completedDuringJob: d.agent ? before !== 1 && after === 1 : null,
  };
  const h = before === null ? '' : `  hydrated ${(before * 100).toFixed(0)}% → ${(after! * 100).toFixed(0)}%`;
  console.error(`    io ${d.mode.padEnd(12)} ${phase.padEnd(6)} ${job.label.padEnd(26)} ${job.metric === 'IOPS' ? `${fmtNum(r.iops)} IOPS` : `${fmtNum(r.mbps)} MB/s`}${h}`);
  return run;
}

async function ioRuns(lab: Lab, size: number, rep: number, order: Mode[]): Promise<IoRun[]> {
  const out: IoRun[] = [];
  for (const mode of order) {
    if (mode === 'streaming') {
      // One deployment per "during" job, each started as soon as the export answers, while
      // the host boots: at 1 Gbit/s a 1 GiB image is mostly local by the boot marker, so
      // measuring from the marker would leave too little of the hydration to measure. The
      // last deployment is then left to finish hydrating for the "after" jobs.
      for (const [i, job] of IO_JOBS.entries()) {
        const { d, marker, stopHost } = await bootedDeployment(lab, mode, size, false);
        try {
          out.push(await ioJob(lab, d, 'during', job, size, rep));
          await marker; // the host must still have booted, with fio reading beside it
          await stopHost();
          if (i === IO_JOBS.length - 1) {
            await d.agent!.complete(hydrationTimeoutMs(lab, size));
            flushFile(d.localFile!);
            dropFileCache(d.localFile!);
            for (const j of IO_JOBS) out.push(await ioJob(lab, d, 'after', j, size, rep));
          }
        } finally {
          await stopHost();
          await d.stop();
        }
      }
      continue;
    }
    const { d, stopHost } = await bootedDeployment(lab, mode, size);
    try {
      if (d.localFile) {
        flushFile(d.localFile);
        dropFileCache(d.localFile);
      }
      for (const job of IO_JOBS) out.push(await ioJob(lab, d, 'after', job, size, rep));
    } finally {
      await stopHost();
      await d.stop();
    }
  }
  return out;
}

// ---------------------------------------------------------------- summary

interface ModeMedians {
  toMarkerS: number;
  toQemuS: number;
  qemuToMarkerS: number;
  wireAtMarker: number;
  wireTotal: number;
  imageLocalS: number | null;
  hydratedAtMarker: number | null;
  qemuCpuS: number;
  agentCpuS: number | null;
  runs: number[];
}

function medians(runs: BootRun[], size: number): Record<Mode, ModeMedians> {
  const out = {} as Record<Mode, ModeMedians>;
  for (const mode of MODES) {
    const rs = runs.filter((r) => r.size === size && r.mode === mode);
    const m = (f: (r: BootRun) => number): number => median(rs.map(f));
    const mn = (f: (r: BootRun) => number | null): number | null => (rs.some((r) => f(r) !== null) ? median(rs.map((r) => f(r) ?? NaN)) : null);
    out[mode] = {
      toMarkerS: m((r) => r.toMarkerS),
      toQemuS: m((r) => r.toQemuS),
      qemuToMarkerS: m((r) => r.qemuToMarkerS),
      wireAtMarker: m((r) => r.wireAtMarker),
      wireTotal: m((r) => r.wireTotal),
      imageLocalS: mn((r) => r.imageLocalS),
      hydratedAtMarker: mn((r) => r.hydratedAtMarker),
      qemuCpuS: m((r) => r.qemuCpuS),
      agentCpuS: mn((r) => r.agentCpuS),
      runs: rs.map((r) => r.toMarkerS),
    };
  }
  return out;
}

interface IoMedian {
  mode: Mode;
  phase: IoPhase;
  iops: number;
  mbps: number;
  /** Per job: hydrated fraction before → after (median), during rows only. */
  hydration: Partial<Record<IoJob['id'], string>>;
}

const IO_ROWS: [Mode, IoPhase][] = [
  ['streaming', 'during'],
  ['streaming', 'after'],
  ['copy-first', 'after'],
  ['network-only', 'after'],
  ['local', 'after'],
];

function ioMedians(runs: IoRun[]): IoMedian[] {
  return IO_ROWS.map(([mode, phase]) => {
    const rs = (id: IoJob['id']): IoRun[] => runs.filter((r) => r.mode === mode && r.phase === phase && r.job === id);
    const hydration: IoMedian['hydration'] = {};
    if (phase === 'during') {
      for (const j of IO_JOBS) {
        const x = rs(j.id);
        const pct = (v: (number | null)[]): string => `${(median(v.map((n) => n ?? NaN)) * 100).toFixed(0)}%`;
        const ended = x.filter((r) => r.completedDuringJob).length;
        hydration[j.id] = `${pct(x.map((r) => r.hydratedBefore))} → ${pct(x.map((r) => r.hydratedAfter))}${ended ? ` (ended during the job in ${ended}/${x.length})` : ''}`;
      }
    }
    return { mode, phase, iops: median(rs('randread-4k-qd1').map((r) => r.iops)), mbps: median(rs('read-1m-qd8').map((r) => r.mbps)), hydration };
  });
}

interface Goals {
  copyFirstOverStreaming: { size: number; link: string; ratio: number; goal: number; met: boolean; note?: string } | null;
  streamingOverLocal: { size: number; ratio: number; goal: number; met: boolean }[];
}

function goals(opts: Options, med: Map<number, Record<Mode, ModeMedians>>): Goals {
  const largest = Math.max(...med.keys());
  const at = med.get(8 * GiB) ? 8 * GiB : largest;
  const m = med.get(at);
  const r = m ? m['copy-first'].toMarkerS / m.streaming.toMarkerS : NaN;
  const notes: string[] = [];
  if (at !== 8 * GiB) notes.push(`no 8 GiB run: figure for ${sizeLabel(at)}`);
  if (Math.abs(opts.linkRate - 125e6) > 1) notes.push(`link is ${opts.linkLabel}, the goal is stated for 1gbit`);
  return {
    copyFirstOverStreaming: m ? { size: at, link: opts.linkLabel, ratio: r, goal: 10, met: r >= 10, ...(notes.length ? { note: notes.join('; ') } : {}) } : null,
    streamingOverLocal: [...med.entries()].map(([size, mm]) => {
      const q = mm.streaming.toMarkerS / mm.local.toMarkerS;
      return { size, ratio: q, goal: 1.05, met: q <= 1.05 };
    }),
  };
}

// ---------------------------------------------------------------- rendering

const s1 = (x: number | null): string => (x === null || !Number.isFinite(x) ? '–' : x.toFixed(x >= 100 ? 0 : 1));
const s2 = (x: number): string => (Number.isFinite(x) ? x.toFixed(2) : '–');

function renderBootTable(m: Record<Mode, ModeMedians>): string {
  return markdownTable(
    ['mode', 'deploy → boot marker (s)', 'deploy → QEMU start (s)', 'QEMU start → marker (s)', 'QEMU CPU until the marker (s)', '× local', 'on the wire until the marker', 'on the wire in total', 'deploy → image all local (s)', 'every run (s)'],
    ['l', 'r', 'r', 'r', 'r', 'r', 'r', 'r', 'r', 'l'],
    MODES.map((mode) => {
      const x = m[mode];
      const hyd = x.hydratedAtMarker !== null ? ` (${(x.hydratedAtMarker * 100).toFixed(0)}% local at the marker)` : '';
      return [
        `${mode}`,
        `**${s2(x.toMarkerS)}**`,
        s2(x.toQemuS),
        s2(x.qemuToMarkerS),
        s2(x.qemuCpuS),
        ratio(x.toMarkerS, m.local.toMarkerS),
        fmtBytes(x.wireAtMarker) + hyd,
        mode === 'network-only' ? `${fmtBytes(x.wireTotal)} (and every later read)` : fmtBytes(x.wireTotal),
        mode === 'network-only' ? 'never' : mode === 'local' ? '0 (already)' : s1(x.imageLocalS),
        x.runs.map((t) => t.toFixed(2)).join(', '),
      ];
    }),
  );
}

function renderRatios(opts: Options, med: Map<number, Record<Mode, ModeMedians>>, g: Goals): string {
  const rows = [...med.entries()].map(([size, m]) => [
    sizeLabel(size),
    `**${ratio(m['copy-first'].toMarkerS, m.streaming.toMarkerS)}**`,
    `**${ratio(m.streaming.toMarkerS, m.local.toMarkerS)}**`,
    ratio(m['network-only'].toMarkerS, m.local.toMarkerS),
    ratio(m['copy-first'].toMarkerS, m.local.toMarkerS),
  ]);
  const c = g.copyFirstOverStreaming;
  const lines = [
    markdownTable(['image', 'copy-first / streaming', 'streaming / local', 'network-only / local', 'copy-first / local'], ['l', 'r', 'r', 'r', 'r'], rows),
    '',
    'Goals (issue #7):',
    '',
  ];
  if (c) lines.push(`- copy-first ≥ 10× slower than streaming to the boot marker, ${sizeLabel(c.size)} at ${opts.linkLabel}: **${c.ratio.toFixed(2)}× — ${c.met ? 'met' : 'missed'}**${c.note ? ` (${c.note})` : ''}.`);
  for (const s of g.streamingOverLocal) lines.push(`- streaming ≤ 1.05× a local-disk boot, ${sizeLabel(s.size)}: **${s.ratio.toFixed(3)}× — ${s.met ? 'met' : 'missed'}**.`);
  return lines.join('\n');
}

function renderIoTable(io: IoMedian[]): string {
  return markdownTable(
    ['mode', 'when', '4K random read QD1 (IOPS)', '1 MiB sequential read QD8 (MB/s)', 'regions local before → after the job'],
    ['l', 'l', 'r', 'r', 'l'],
    io.map((r) => [
      r.mode,
      r.phase === 'during' ? 'during hydration (host booting)' : r.mode === 'network-only' ? 'after the marker (never local)' : 'after the image is local',
      fmtNum(r.iops, 0),
      fmtNum(r.mbps),
      r.phase === 'during' ? IO_JOBS.map((j) => `${j.id === 'randread-4k-qd1' ? '4K' : '1M'}: ${r.hydration[j.id]}`).join('; ') : '',
    ]),
  );
}

function renderSection(p: {
  opts: Options; cmd: string; date: string; m: MachineInfo; nginx: string; med: Map<number, Record<Mode, ModeMedians>>; g: Goals; io: IoMedian[]; ioSize: number; raw: string; pngs: (string | null)[];
}): string {
  const { opts } = p;
  const img = p.pngs.filter((x): x is string => !!x).map((f) => `![${path.basename(f, '.png')}](${path.relative('docs', f)})`).join('\n');
  return `${SECTION}

Generated by \`bench/deploy-modes.ts\`; re-run it to update this section (the rest of the file is
left alone).

- Command: \`${p.cmd}\`
- Date: ${p.date}
- Machine: ${describeMachine(p.m)}; ${p.nginx}
- Link: veth pair into a network namespace shaped with \`tc tbf rate ${opts.linkLabel}\` both ways
  (lab/netns.ts); the origin is nginx-light (sendfile, Range) inside the namespace. Bytes on
  the wire are the host-side veth's rx_bytes (payload plus TCP/IP headers).
- Image: the boot fixture (MBR, FAT with SYSLINUX + Debian kernel + busybox initramfs that
  prints \`SMARTNIC-BOOT-OK\`) padded with incompressible bytes to each size; the boot
  itself reads a few tens of MB of it.
- Host: \`qemu-system-x86_64 -machine q35 -m 512 -nographic -nodefaults -serial stdio -monitor none
  -no-reboot -drive file=nbd:unix:SOCK,if=none,id=d0,format=raw -device nvme,drive=d0,serial=smartnic0
  -boot c\`, TCG (no KVM here), stopped at the marker.
- Modes (the clock starts when the first process of the mode is spawned; each export is
  polled every 10 ms for its NBD greeting before QEMU starts):
${MODES.map((mode) => `  - **${mode}**: ${MODE_HOW[mode]}`).join('\n')}
- ${opts.reps} run(s) per mode and size, mode order rotated per run; tables show medians.
- Raw runs and the goal figures: \`${p.raw}\`

${[...p.med.entries()].map(([size, m]) => `### ${sizeLabel(size)} image\n\n${renderBootTable(m)}`).join('\n\n')}

### Ratios of the medians

${renderRatios(opts, p.med, p.g)}

${opts.io ? `### Disk I/O of the booted host (${sizeLabel(p.ioSize)} image)

fio \`--ioengine=nbd\` (one job, one connection) against the export the host boots from,
${opts.ioRuntime} s per job, median of ${opts.reps}. "During": a fresh streaming deploy per job, fio started
as soon as the export answers, while the host boots beside it and hydration runs; the
sequential read starts at the hydration front (data not yet local). "After": fio starts at
the boot marker (the guest powers off a moment later) once the image is local, with the page
cache of the export's local file dropped first, so reads come from the disk; network-only
is never local and reads the origin.

${renderIoTable(p.io)}
` : '(I/O part skipped: --no-io)\n'}${img ? `\n${img}\n` : ''}`;
}

function plots(opts: Options, med: Map<number, Record<Mode, ModeMedians>>, io: IoMedian[], ioSize: number): (string | null)[] {
  const sizes = [...med.keys()];
  const ioCats = io.map((r) => `${r.mode}${r.phase === 'during' ? ' (during)' : ''}`);
  return [
    plot({
      file: 'bench-deploy-modes-boot.png',
      title: `Deploy → boot marker over a ${opts.linkLabel} link (median, lower is better)`,
      xlabel: 'image size',
      ylabel: 'seconds',
      categories: sizes.map(sizeLabel),
      series: MODES.map((mode) => ({ title: mode, points: sizes.map((s, i): [number, number] => [i, med.get(s)![mode].toMarkerS]) })),
    }),
    // No I/O plot without I/O runs (--no-io): the old PNG stays as it was.
    !opts.io ? null : plot({
      file: 'bench-deploy-modes-io.png',
      title: `Disk of the booted host, ${sizeLabel(ioSize)} image (higher is better)`,
      xlabel: '',
      ylabel: 'IOPS  |  MB/s',
      categories: ioCats,
      series: [
        { title: '4K random read QD1 (IOPS)', points: io.map((r, i): [number, number] => [i, r.iops]) },
        { title: '1 MiB seq read QD8 (MB/s)', points: io.map((r, i): [number, number] => [i, r.mbps]) },
      ],
      extra: ['set xtics font ",9"'],
    }),
  ];
}

// ---------------------------------------------------------------- main

async function main(): Promise<void> {
  const opts = parseOptions(process.argv.slice(2));
  const log = (s: string): void => console.error(s);
  const date = new Date();
  const cmd = commandLine();
  const m = await machineInfo(['qemu-system-x86_64', 'nbdkit', 'fio', 'curl']);
  const nginxV = (await run('nginx', ['-v'], { allowFail: true })).stderr.trim();

  const dir = opts.workdir ?? fs.mkdtempSync(path.join(os.tmpdir(), 'deploy-modes-'));
  fs.mkdirSync(dir, { recursive: true });
  if (!opts.keep) removeAtEnd(dir);
  log(`deploy-modes: sizes ${opts.sizes.map(sizeLabel).join(', ')}, link ${opts.linkLabel}, ${opts.reps} rep(s); work dir ${dir}`);

  const link = EmulatedLink.create({ index: opts.linkIndex, rate: opts.linkRate });
  let origin: ChildProcess | null = null;
  onCleanup(async () => {
    if (origin) await stopChild(origin);
    await link.destroy();
  });
  const root = path.join(dir, 'origin');
  fs.mkdirSync(root, { recursive: true });
  const o = await startNginxOrigin(link, dir, root);
  origin = o.child;
  const lab: Lab = {
    opts, dir, link, seq: 0,
    image: (size) => path.join(root, `boot-${size / MiB}M.raw`),
    url: (size) => `${o.base}/boot-${size / MiB}M.raw`,
    rx: () => link.rxBytes(),
  };
  log(`  link ${link.ns} (${link.hostIf} ⇄ ${link.nsIf}) at ${opts.linkLabel}; nginx pid ${o.child.pid} at ${o.base}`);

  const bootRuns: BootRun[] = [];
  const io: IoRun[] = [];
  const ioSize = opts.sizes[0]!;
  for (const size of opts.sizes) {
    const t = performance.now();
    await buildPaddedBootImage(lab.image(size), size, { onProgress: (w, n) => w % GiB === 0 && log(`  image ${sizeLabel(size)}: ${fmtBytes(w)} / ${fmtBytes(n)}`) });
    log(`  image ${sizeLabel(size)} built in ${((performance.now() - t) / 1000).toFixed(1)} s`);
    const head = await fetch(lab.url(size), { method: 'HEAD' });
    if (Number(head.headers.get('content-length')) !== size) throw new Error(`origin serves ${head.headers.get('content-length')} bytes for ${lab.url(size)}, expected ${size}`);

    for (let rep = 1; rep <= opts.reps; rep++) {
      const order = MODES.map((_, i) => MODES[(i + rep - 1) % MODES.length]!);
      for (const mode of order) {
        const r = await bootRun(lab, mode, size, rep);
        bootRuns.push(r);
        log(
          `  ${sizeLabel(size)} rep ${rep} ${mode.padEnd(12)} marker ${r.toMarkerS.toFixed(2).padStart(7)} s (QEMU at ${r.toQemuS.toFixed(2)} s + ${r.qemuToMarkerS.toFixed(2)} s)` +
            ` QEMU CPU ${r.qemuCpuS.toFixed(2)} s${r.agentCpuS !== null ? `, agent CPU ${r.agentCpuS.toFixed(2)} s` : ''}, load ${r.load1}` +
            `  wire ${fmtBytes(r.wireAtMarker)} / ${fmtBytes(r.wireTotal)}${r.imageLocalS !== null ? `  all local at ${r.imageLocalS.toFixed(1)} s` : ''}`,
        );
        await sleep(500);
      }
    }
    if (size === ioSize && opts.io) {
      for (let rep = 1; rep <= opts.reps; rep++) {
        const order = MODES.map((_, i) => MODES[(i + rep - 1) % MODES.length]!);
        io.push(...(await ioRuns(lab, size, rep, order)));
      }
    }
    if (!opts.keep) fs.rmSync(lab.image(size), { force: true });
  }

  const med = new Map(opts.sizes.map((s) => [s, medians(bootRuns, s)]));
  const g = goals(opts, med);
  const iom = ioMedians(io);
  const raw = writeResults('deploy-modes', date, {
    command: cmd,
    date: date.toISOString(),
    options: opts,
    machine: m,
    nginx: nginxV,
    summary: {
      linkBitsPerSecond: opts.linkRate * 8,
      goals: g,
      medians: Object.fromEntries([...med.entries()].map(([s, mm]) => [String(s), mm])),
      io: iom,
    },
    bootRuns,
    ioRuns: io,
  });
  const pngs = opts.docs ? plots(opts, med, iom, ioSize) : [];
  const section = renderSection({ opts, cmd, date: date.toISOString(), m, nginx: nginxV, med, g, io: iom, ioSize, raw, pngs });
  console.log(section);
  if (opts.docs) {
    updateDocSection(SECTION, section);
    log(`updated ${path.relative(REPO, DOC)}; raw runs in ${raw}`);
  } else {
    log(`raw runs in ${raw} (docs/ not touched${opts.quick ? ': --quick' : ''})`);
  }
}

runMain('deploy-modes', main);

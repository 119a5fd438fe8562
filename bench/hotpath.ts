/**
 * Hot-path benchmark: fio's nbd engine against a hydrated dpu-agent, nbdkit (the
 * reference) and qemu-nbd, on the same 1 GiB image, in one run.
 *
 * Why it is shaped this way:
 * - Every server gets its own copy of the image, so one server's sequential-write run
 *   cannot change what the next server reads (and none of them share page-cache pages).
 *   The agent's copy is its target file, written by its own hydration from a local HTTP
 *   origin; the bench waits for `complete`, so the agent measured is the hydrated one
 *   whose reads and writes all go to the target.
 * - Servers are started once and stay up; fio runs are interleaved (round → workload →
 *   server, server order rotated every round) so slow drifts of the machine (the lead's
 *   tests, writeback, thermal) fall on all servers alike instead of on one.
 * - Dirty pages are flushed outside the measured windows (after setup and after every
 *   write run), so kernel writeback started by one run does not bill the next one.
 * - Server CPU comes from /proc/PID/stat (utime+stime, all threads) around each fio run,
 *   divided by fio's completed operations: it is what a busy DPU core would pay per I/O.
 *   No ramp time, so the CPU window and fio's op count cover the same requests.
 *
 * Run it under the machine's heavy-work lock: `flock /tmp/heavy.lock node dist/bench/hotpath.js`.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { AgentProcess } from '../tests/helpers/agent.js';
import { TestOrigin } from '../tests/helpers/origin.js';
import {
  BENCH_FLAGS,
  DOC,
  MiB,
  benchFlags,
  positive,
  parseSizeArg,
  REPO,
  commandLine,
  cpuSeconds,
  describeMachine,
  flushFile,
  fmtBytes,
  fmtNum,
  freePort,
  machineInfo,
  makeRandomImage,
  median,
  onCleanup,
  plot,
  ratio,
  removeAtEnd,
  runMain,
  settleAndWarm,
  sleep,
  stopChild,
  track,
  updateDocSection,
  waitNbdReady,
  writeResults,
  type MachineInfo,
} from './lib/common.js';

const SECTION_UNIX = '## Hot path (fio nbd engine)';
const SECTION_TCP = '## Hot path over loopback TCP (fio nbd engine)';

// ---------------------------------------------------------------- options

const USAGE = `Usage: node dist/bench/hotpath.js [options]   (run it under: flock /tmp/heavy.lock …)

  --runtime S     seconds per fio run (default 5)
  --reps N        rounds; every workload × server runs once per round (default 3)
  --quick         smoke run: 2 s × 1 round; docs/benchmarks.md is left alone unless --docs
  --tcp           loopback TCP instead of unix sockets
  --size SIZE     image size, e.g. 1G or 256M (default 1G)
  --agent-node-flags=STR
                  node flags for the agent, space-separated, given with = (e.g.
                  --agent-node-flags=--optimize-for-size); shown in the report. Such a
                  run is not taken for the goals table
  --workdir DIR   where the image copies go (default: a fresh directory in the OS temp dir)
  --keep          keep the work directory
  --docs          update docs/benchmarks.md even with --quick
  --no-docs       do not touch docs/benchmarks.md
  --help`;

interface Options {
  runtime: number;
  reps: number;
  quick: boolean;
  tcp: boolean;
  size: number;
  agentNodeFlags: string[];
  workdir: string | undefined;
  keep: boolean;
  docs: boolean;
}

function parseOptions(argv: string[]): Options {
  const { values: v } = parseArgs({
    args: argv,
    strict: true,
    options: { ...BENCH_FLAGS, runtime: { type: 'string' }, reps: { type: 'string' }, tcp: { type: 'boolean' }, size: { type: 'string' }, 'agent-node-flags': { type: 'string' } },
  });
  const common = benchFlags(v, USAGE);
  const size = parseSizeArg(v.size ?? '1G', '--size');
  if (size < 16 * MiB || size % MiB !== 0) throw new Error('--size must be a whole number of MiB, at least 16M');
  return {
    ...common,
    runtime: positive('runtime', v.runtime, common.quick ? 2 : 5),
    reps: Math.round(positive('reps', v.reps, common.quick ? 1 : 3)),
    tcp: v.tcp === true,
    size,
    agentNodeFlags: (v['agent-node-flags'] ?? '').split(/\s+/).filter((f) => f !== ''),
  };
}

// ---------------------------------------------------------------- workloads

interface Workload {
  id: string;
  label: string;
  rw: 'randread' | 'read' | 'write';
  bs: string;
  iodepth: number;
  /** How the table shows it: operations/s for small blocks, MB/s for large. */
  metric: 'IOPS' | 'MB/s';
}

const WORKLOADS: Workload[] = [
  { id: 'randread-4k-qd1', label: '4K random read QD1', rw: 'randread', bs: '4k', iodepth: 1, metric: 'IOPS' },
  { id: 'randread-4k-qd32', label: '4K random read QD32', rw: 'randread', bs: '4k', iodepth: 32, metric: 'IOPS' },
  { id: 'read-1m-qd8', label: '1 MiB sequential read QD8', rw: 'read', bs: '1M', iodepth: 8, metric: 'MB/s' },
  { id: 'write-1m-qd8', label: '1 MiB sequential write QD8', rw: 'write', bs: '1M', iodepth: 8, metric: 'MB/s' },
];

const SERVER_NAMES = ['agent', 'nbdkit', 'qemu-nbd'] as const;
type ServerName = (typeof SERVER_NAMES)[number];

// ---------------------------------------------------------------- servers

interface Server {
  name: ServerName;
  pid: number;
  uri: string;
  file: string;
  child: ChildProcess;
}

interface Endpoint {
  /** What the agent's --listen takes. */
  agentListen: string;
  uri: string;
  socket: string;
  port: number;
}

async function endpoint(tcp: boolean, dir: string, name: string): Promise<Endpoint> {
  if (tcp) {
    const port = await freePort();
    return { agentListen: `tcp:127.0.0.1:${port}`, uri: `nbd://127.0.0.1:${port}/`, socket: '', port };
  }
  const socket = path.join(dir, `${name}.sock`);
  return { agentListen: `unix:${socket}`, uri: `nbd+unix:///?socket=${socket}`, socket, port: 0 };
}

async function startPeer(name: 'nbdkit' | 'qemu-nbd', file: string, ep: Endpoint, size: number): Promise<Server> {
  const args =
    name === 'nbdkit'
      ? ['-f', ...(ep.socket ? ['-U', ep.socket] : ['-i', '127.0.0.1', '-p', String(ep.port)]), 'file', file]
      : ['-f', 'raw', '-t', '-e', '8', '--cache=writeback', '--aio=threads', ...(ep.socket ? ['-k', ep.socket] : ['-b', '127.0.0.1', '-p', String(ep.port)]), file];
  const child = track(spawn(name, args, { stdio: ['ignore', 'ignore', 'pipe'] }));
  let stderr = '';
  child.stderr!.setEncoding('utf8').on('data', (d: string) => (stderr = (stderr + d).slice(-8000)));
  child.once('error', (err) => (stderr += `\nspawn: ${err.message}`));
  await waitNbdReady(child, name, ep.uri, size, () => stderr);
  return { name, pid: child.pid!, uri: ep.uri, file, child };
}

async function startAgent(image: string, dir: string, ep: Endpoint, size: number, nodeArgs: string[], log: (s: string) => void): Promise<{ server: Server; hydrateMs: number }> {
  const origin = new TestOrigin({ file: image });
  const url = await origin.start();
  onCleanup(() => origin.stop());
  const target = path.join(dir, 'agent-target.raw');
  const state = path.join(dir, 'agent-state');
  // AgentProcess always passes a unix --listen; a second --listen wins (node parseArgs
  // keeps the last value of a single-valued option), which is how --tcp reaches the agent.
  const agent = new AgentProcess({ source: url, target, state, socket: ep.socket || path.join(dir, 'unused.sock'), extra: ep.socket ? [] : ['--listen', ep.agentListen], poison: false, nodeArgs });
  track(agent.child);
  const t0 = Date.now();
  await agent.listening();
  log(`  agent listening; hydrating ${fmtBytes(size)} from ${url}`);
  const done = await agent.complete(600_000);
  const hydrateMs = Number(done['elapsedMs'] ?? Date.now() - t0);
  await waitNbdReady(agent.child, 'agent', ep.uri, size, () => agent.stderr);
  return { server: { name: 'agent', pid: agent.child.pid!, uri: ep.uri, file: target, child: agent.child }, hydrateMs };
}

// ---------------------------------------------------------------- measuring

interface FioDir {
  io_bytes: number;
  bw_bytes: number;
  iops: number;
  runtime: number;
  total_ios: number;
  clat_ns?: { mean: number; percentile?: Record<string, number> };
  lat_ns?: { mean: number };
}

interface RunRecord {
  round: number;
  workload: string;
  server: ServerName;
  startedAt: string;
  iops: number;
  mbps: number;
  ops: number;
  runtimeMs: number;
  serverCpuS: number;
  cpuUsPerOp: number;
  fioCpu: { usr: number; sys: number };
  clatNs: { mean: number; p50?: number; p99?: number };
  fio: unknown;
}

function fioArgs(w: Workload, uri: string, runtime: number): string[] {
  return [
    '--name=hotpath',
    '--ioengine=nbd',
    `--uri=${uri}`,
    `--rw=${w.rw}`,
    `--bs=${w.bs}`,
    `--iodepth=${w.iodepth}`,
    `--runtime=${runtime}`,
    '--time_based',
    // No random map: with it fio's own bookkeeping grows with coverage and its CPU — on a
    // 2-core machine shared with the server — would change during the run.
    '--norandommap',
    '--output-format=json',
  ];
}

async function runFio(w: Workload, server: Server, runtime: number, round: number): Promise<RunRecord> {
  const args = fioArgs(w, server.uri, runtime);
  const startedAt = new Date().toISOString();
  const cpu0 = cpuSeconds(server.pid, server.name);
  const child = track(spawn('fio', args, { stdio: ['ignore', 'pipe', 'pipe'] }));
  let out = '';
  let err = '';
  child.stdout!.setEncoding('utf8').on('data', (d: string) => (out += d));
  child.stderr!.setEncoding('utf8').on('data', (d: string) => (err += d));
  const killer = setTimeout(() => child.kill('SIGKILL'), (runtime + 60) * 1000);
  const code = await new Promise<number | null>((resolve, reject) => {
    child.once('error', reject);
    child.once('exit', (c) => resolve(c));
  });
  clearTimeout(killer);
  const cpu1 = cpuSeconds(server.pid, server.name);
  if (code !== 0) throw new Error(`fio ${w.id} against ${server.name} exited ${code}: ${err.slice(-2000)} ${out.slice(-2000)}`);
  // fio's nbd engine prints "connected to NBD server …" before the JSON document.
  const start = out.indexOf('{');
  if (start < 0) throw new Error(`fio printed no JSON: ${out.slice(0, 500)} ${err.slice(-500)}`);
  const doc = JSON.parse(out.slice(start, out.lastIndexOf('}') + 1)) as { jobs: Record<string, unknown>[] };
  const job = doc.jobs[0]!;
  const dirName = w.rw === 'write' ? 'write' : 'read';
  const dir = job[dirName] as FioDir;
  if (Number(job['error']) !== 0 || dir.total_ios === 0) throw new Error(`fio ${w.id} against ${server.name}: error ${String(job['error'])}, ${dir.total_ios} ops`);
  const serverCpuS = cpu1 - cpu0;
  const pct = dir.clat_ns?.percentile ?? {};
  return {
    round,
    workload: w.id,
    server: server.name,
    startedAt,
    iops: dir.iops,
    mbps: dir.bw_bytes / 1e6,
    ops: dir.total_ios,
    runtimeMs: dir.runtime,
    serverCpuS,
    cpuUsPerOp: (serverCpuS * 1e6) / dir.total_ios,
    fioCpu: { usr: Number(job['usr_cpu']), sys: Number(job['sys_cpu']) },
    clatNs: { mean: dir.clat_ns?.mean ?? NaN, p50: pct['50.000000'], p99: pct['99.000000'] },
    // The direction that ran plus fio's CPU and options: the rest of fio's document is
    // the idle directions' zeros.
    fio: { [dirName]: dir, usr_cpu: job['usr_cpu'], sys_cpu: job['sys_cpu'], ctx: job['ctx'], 'job options': job['job options'], latency_us: job['latency_us'] },
  };
}

// ---------------------------------------------------------------- files

// ---------------------------------------------------------------- reporting

interface Summary {
  workload: Workload;
  value: Record<ServerName, number>;
  spread: Record<ServerName, string>;
  cpu: Record<ServerName, number>;
}

function summarize(runs: RunRecord[]): Summary[] {
  return WORKLOADS.map((w) => {
    const value = {} as Record<ServerName, number>;
    const spread = {} as Record<ServerName, string>;
    const cpu = {} as Record<ServerName, number>;
    for (const s of SERVER_NAMES) {
      const mine = runs.filter((r) => r.workload === w.id && r.server === s);
      const vals = mine.map((r) => (w.metric === 'IOPS' ? r.iops : r.mbps));
      value[s] = vals.length ? median(vals) : NaN;
      spread[s] = vals.map(fmtNum).join(' / ');
      cpu[s] = mine.length ? median(mine.map((r) => r.cpuUsPerOp)) : NaN;
    }
    return { workload: w, value, spread, cpu };
  });
}

function renderTable(sum: Summary[]): string {
  const lines = [
    '| workload | agent | nbdkit | qemu-nbd | agent / nbdkit | qemu-nbd / nbdkit | CPU µs/op agent | CPU µs/op nbdkit | CPU µs/op qemu-nbd |',
    '|---|--:|--:|--:|--:|--:|--:|--:|--:|',
  ];
  for (const { workload: w, value: v, cpu: c } of sum) {
    lines.push(
      `| ${w.label} (${w.metric}) | ${fmtNum(v.agent)} | ${fmtNum(v.nbdkit)} | ${fmtNum(v['qemu-nbd'])} | **${ratio(v.agent, v.nbdkit)}** | ${ratio(v['qemu-nbd'], v.nbdkit)} | ${fmtNum(c.agent)} | ${fmtNum(c.nbdkit)} | ${fmtNum(c['qemu-nbd'])} |`,
    );
  }
  return lines.join('\n');
}

function renderSpread(sum: Summary[]): string {
  const lines = ['| workload | agent | nbdkit | qemu-nbd |', '|---|---|---|---|'];
  for (const { workload: w, spread: s } of sum) lines.push(`| ${w.label} (${w.metric}) | ${s.agent} | ${s.nbdkit} | ${s['qemu-nbd']} |`);
  return lines.join('\n');
}

/** Each server's median relative to nbdkit's, per workload (nbdkit = 1). */
function plotRatios(sum: Summary[], tcp: boolean): string | null {
  return plot({
    file: `bench-hotpath-${tcp ? 'tcp' : 'unix'}.png`,
    title: `Hot path over ${tcp ? 'loopback TCP' : 'a unix socket'}: throughput relative to nbdkit (higher is better)`,
    xlabel: '',
    ylabel: '× nbdkit',
    categories: sum.map((s) => `${s.workload.label}`),
    series: SERVER_NAMES.map((n) => ({ title: n, points: sum.map((s, i): [number, number] => [i, s.value[n] / s.value.nbdkit]) })),
    extra: ['set xtics font ",9"'],
  });
}

function renderSection(p: { opts: Options; cmd: string; date: string; m: MachineInfo; sum: Summary[]; hydrateMs: number; rawFile: string; png: string | null }): string {
  const { opts, m } = p;
  const transport = opts.tcp ? 'loopback TCP' : 'unix socket';
  return `${opts.tcp ? SECTION_TCP : SECTION_UNIX}

Generated by \`bench/hotpath.ts\`; re-run it to update this section (the rest of the file is
left alone).

- Command: \`${p.cmd}\`
- Date: ${p.date}
- Machine: ${describeMachine(m)}
- Setup: ${fmtBytes(opts.size)} of random data; each server serves its own copy of it (the
  agent its target file, hydrated from a local HTTP origin in ${(p.hydrateMs / 1000).toFixed(1)} s before
  measuring), page cache warm, ${transport}. fio \`--ioengine=nbd\`, one job, ${opts.runtime} s per run,
  ${opts.reps} round(s) with the servers interleaved; the table shows medians.
- Servers: \`${opts.agentNodeFlags.length ? `node ${opts.agentNodeFlags.join(' ')} ` : ''}dpu-agent stream … --listen ${opts.tcp ? 'tcp:…' : 'unix:SOCK'}\` (after \`complete\`),
  \`nbdkit -f ${opts.tcp ? '-i 127.0.0.1 -p PORT' : '-U SOCK'} file FILE\`,
  \`qemu-nbd -f raw -t -e 8 --cache=writeback --aio=threads ${opts.tcp ? '-b 127.0.0.1 -p PORT' : '-k SOCK'} FILE\`.
- CPU µs/op: the server process's utime+stime (all threads, /proc/PID/stat) over the run,
  divided by the operations fio completed. fio runs on the same 2 cores.
- Raw runs: \`${p.rawFile}\`

${renderTable(p.sum)}
${p.png ? `\n![${transport}: throughput relative to nbdkit](${path.relative('docs', p.png)})\n` : ''}
<details><summary>Every run (round 1 / 2 / …)</summary>

${renderSpread(p.sum)}

</details>
`;
}

// ---------------------------------------------------------------- main

async function main(): Promise<void> {
  const opts = parseOptions(process.argv.slice(2));
  const log = (s: string): void => console.error(s);
  const date = new Date();
  const m = await machineInfo(['fio', 'nbdkit', 'qemu-nbd']);
  const cmd = commandLine();

  const dir = opts.workdir ?? fs.mkdtempSync(path.join(os.tmpdir(), 'hotpath-'));
  fs.mkdirSync(dir, { recursive: true });
  if (!opts.keep) removeAtEnd(dir);

  log(`hotpath: ${fmtBytes(opts.size)}, ${opts.runtime} s × ${opts.reps} round(s), ${opts.tcp ? 'tcp' : 'unix'}; work dir ${dir}`);
  const image = path.join(dir, 'image.raw');
  makeRandomImage(image, opts.size);
  const copies: Record<'nbdkit' | 'qemu-nbd', string> = { nbdkit: path.join(dir, 'nbdkit.raw'), 'qemu-nbd': path.join(dir, 'qemu-nbd.raw') };
  for (const f of Object.values(copies)) fs.copyFileSync(image, f);

  const servers = {} as Record<ServerName, Server>;
  const { server: agent, hydrateMs } = await startAgent(image, dir, await endpoint(opts.tcp, dir, 'agent'), opts.size, opts.agentNodeFlags, log);
  servers.agent = agent;
  onCleanup(() => stopChild(agent.child));
  for (const name of ['nbdkit', 'qemu-nbd'] as const) {
    const s = await startPeer(name, copies[name], await endpoint(opts.tcp, dir, name), opts.size);
    servers[name] = s;
    onCleanup(() => stopChild(s.child));
  }
  for (const s of Object.values(servers)) settleAndWarm(s.file);
  log(`  servers: ${SERVER_NAMES.map((n) => `${n} pid ${servers[n].pid}`).join(', ')}; hydration took ${(hydrateMs / 1000).toFixed(1)} s`);

  const runs: RunRecord[] = [];
  for (let round = 1; round <= opts.reps; round++) {
    // Rotate the server order each round so no server always runs first (or right after
    // the write run of another).
    const order = SERVER_NAMES.map((_, i) => SERVER_NAMES[(i + round - 1) % SERVER_NAMES.length]!);
    for (const w of WORKLOADS) {
      for (const name of order) {
        const r = await runFio(w, servers[name], opts.runtime, round);
        runs.push(r);
        log(`  round ${round} ${w.id.padEnd(17)} ${name.padEnd(8)} ${fmtNum(w.metric === 'IOPS' ? r.iops : r.mbps).padStart(9)} ${w.metric.padEnd(4)}  ${r.cpuUsPerOp.toFixed(1)} CPU-µs/op`);
        if (w.rw === 'write') flushFile(servers[name].file);
        await sleep(300);
      }
    }
  }

  const sum = summarize(runs);
  const rawRel = writeResults(opts.tcp ? 'hotpath-tcp' : 'hotpath', date, {
    command: cmd,
    date: date.toISOString(),
    options: opts,
    machine: m,
    hydrateMs,
    workloads: WORKLOADS.map((w) => ({ ...w, fioArgs: fioArgs(w, '<URI>', opts.runtime) })),
    medians: sum.map((s) => ({ workload: s.workload.id, metric: s.workload.metric, value: s.value, cpuUsPerOp: s.cpu })),
    runs,
  });
  const png = opts.docs ? plotRatios(sum, opts.tcp) : null;

  const section = renderSection({ opts, cmd, date: date.toISOString(), m, sum, hydrateMs, rawFile: rawRel, png });
  console.log(section);
  if (opts.docs) {
    updateDocSection(opts.tcp ? SECTION_TCP : SECTION_UNIX, section);
    log(`updated ${path.relative(REPO, DOC)}; raw runs in ${rawRel}`);
  } else {
    log(`raw runs in ${rawRel} (docs/benchmarks.md not touched${opts.quick ? ': --quick' : ''})`);
  }
}

runMain('hotpath', main);

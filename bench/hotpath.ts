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
import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { AgentProcess } from '../tests/helpers/agent.js';
import { TestOrigin } from '../tests/helpers/origin.js';
import { run } from '../tests/helpers/run.js';

const REPO = fileURLToPath(new URL('../../', import.meta.url));
const DOC = path.join(REPO, 'docs/benchmarks.md');
const RESULTS_DIR = path.join(REPO, 'bench/results');
const SECTION = '## Hot path (fio nbd engine)';

// ---------------------------------------------------------------- options

const USAGE = `Usage: node dist/bench/hotpath.js [options]   (run it under: flock /tmp/heavy.lock …)

  --runtime S     seconds per fio run (default 5)
  --reps N        rounds; every workload × server runs once per round (default 3)
  --quick         smoke run: 2 s × 1 round; docs/benchmarks.md is left alone unless --docs
  --tcp           loopback TCP instead of unix sockets
  --size SIZE     image size, e.g. 1G or 256M (default 1G)
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
  workdir: string | undefined;
  keep: boolean;
  docs: boolean;
}

function parseOptions(argv: string[]): Options {
  const { values: v } = parseArgs({
    args: argv,
    strict: true,
    options: {
      runtime: { type: 'string' },
      reps: { type: 'string' },
      quick: { type: 'boolean' },
      tcp: { type: 'boolean' },
      size: { type: 'string' },
      workdir: { type: 'string' },
      keep: { type: 'boolean' },
      docs: { type: 'boolean' },
      'no-docs': { type: 'boolean' },
      help: { type: 'boolean' },
    },
  });
  if (v.help) {
    console.log(USAGE);
    process.exit(0);
  }
  const quick = v.quick === true;
  const num = (name: string, s: string | undefined, dflt: number): number => {
    if (s === undefined) return dflt;
    const n = Number(s);
    if (!Number.isFinite(n) || n <= 0) throw new Error(`--${name} "${s}" is not a positive number`);
    return n;
  };
  return {
    runtime: num('runtime', v.runtime, quick ? 2 : 5),
    reps: Math.round(num('reps', v.reps, quick ? 1 : 3)),
    quick,
    tcp: v.tcp === true,
    size: parseSize(v.size ?? '1G'),
    workdir: v.workdir,
    keep: v.keep === true,
    docs: v['no-docs'] ? false : v.docs === true || !quick,
  };
}

function parseSize(s: string): number {
  const m = /^(\d+)([KMG]?)(i?B)?$/i.exec(s.trim());
  if (!m) throw new Error(`--size "${s}" is not a size like 1G or 256M`);
  const shift = { '': 0, K: 10, M: 20, G: 30 }[m[2]!.toUpperCase() as '' | 'K' | 'M' | 'G'];
  const n = Number(m[1]) * 2 ** shift;
  if (n < 16 << 20 || n % (1 << 20) !== 0) throw new Error(`--size must be a whole number of MiB, at least 16M`);
  return n;
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

// ---------------------------------------------------------------- process bookkeeping

/**
 * Every child the bench starts, so they are all killed by PID however the bench ends:
 * normal end, exception, Ctrl-C, SIGTERM. The `exit` hook is the last resort (it can only
 * act synchronously, hence SIGKILL).
 */
const children = new Set<ChildProcess>();
const cleanups: (() => Promise<void>)[] = [];
/** Removed only after every child is gone, so no server loses its file while running. */
let workdirToRemove: string | null = null;

function track(child: ChildProcess): ChildProcess {
  children.add(child);
  child.once('exit', () => children.delete(child));
  return child;
}

async function stopChild(child: ChildProcess, graceMs = 5000): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  child.kill('SIGTERM');
  const timer = setTimeout(() => child.kill('SIGKILL'), graceMs);
  await exited;
  clearTimeout(timer);
}

/** Set by a signal: from then on failures are the teardown's echo, not news. */
let interrupted = false;
let cleaningUp: Promise<void> | null = null;
function cleanupAll(): Promise<void> {
  cleaningUp ??= (async () => {
    for (const fn of cleanups.reverse()) {
      try {
        await fn();
      } catch (err) {
        console.error(`cleanup: ${(err as Error).message}`);
      }
    }
    await Promise.all([...children].map((c) => stopChild(c)));
    if (workdirToRemove) fs.rmSync(workdirToRemove, { recursive: true, force: true });
  })();
  return cleaningUp;
}

process.on('exit', () => {
  for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
});
for (const [sig, code] of [['SIGINT', 130], ['SIGTERM', 143], ['SIGHUP', 129]] as const) {
  process.on(sig, () => {
    interrupted = true;
    console.error(`\n${sig}: stopping servers`);
    void cleanupAll().finally(() => process.exit(code));
  });
}

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

async function freePort(): Promise<number> {
  const srv = net.createServer();
  await new Promise<void>((resolve) => srv.listen(0, '127.0.0.1', resolve));
  const port = (srv.address() as net.AddressInfo).port;
  await new Promise<void>((resolve) => srv.close(() => resolve()));
  return port;
}

async function endpoint(tcp: boolean, dir: string, name: string): Promise<Endpoint> {
  if (tcp) {
    const port = await freePort();
    return { agentListen: `tcp:127.0.0.1:${port}`, uri: `nbd://127.0.0.1:${port}/`, socket: '', port };
  }
  const socket = path.join(dir, `${name}.sock`);
  return { agentListen: `unix:${socket}`, uri: `nbd+unix:///?socket=${socket}`, socket, port: 0 };
}

/** Polls with nbdinfo until the export answers with the expected size (or the server dies). */
async function waitReady(child: ChildProcess, name: string, uri: string, size: number, stderr: () => string): Promise<void> {
  const deadline = Date.now() + 20_000;
  let last = '';
  while (Date.now() < deadline) {
    if (child.exitCode !== null || child.signalCode !== null) throw new Error(`${name} exited (${child.exitCode ?? child.signalCode}): ${stderr().slice(-2000)}`);
    const r = await run('nbdinfo', ['--size', uri], { allowFail: true, timeoutMs: 5000 });
    if (r.code === 0) {
      const got = Number(r.stdout.trim());
      if (got !== size) throw new Error(`${name} exports ${got} bytes, expected ${size}`);
      return;
    }
    last = r.stderr;
    await sleep(100);
  }
  throw new Error(`${name} did not answer on ${uri} within 20 s: ${last}; ${stderr().slice(-2000)}`);
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
  await waitReady(child, name, ep.uri, size, () => stderr);
  return { name, pid: child.pid!, uri: ep.uri, file, child };
}

async function startAgent(image: string, dir: string, ep: Endpoint, size: number, log: (s: string) => void): Promise<{ server: Server; hydrateMs: number }> {
  const origin = new TestOrigin({ file: image });
  const url = await origin.start();
  cleanups.push(() => origin.stop());
  const target = path.join(dir, 'agent-target.raw');
  const state = path.join(dir, 'agent-state');
  // AgentProcess always passes a unix --listen; a second --listen wins (node parseArgs
  // keeps the last value of a single-valued option), which is how --tcp reaches the agent.
  const agent = new AgentProcess({ source: url, target, state, socket: ep.socket || path.join(dir, 'unused.sock'), extra: ep.socket ? [] : ['--listen', ep.agentListen] });
  track(agent.child);
  const t0 = Date.now();
  await agent.listening();
  log(`  agent listening; hydrating ${fmtBytes(size)} from ${url}`);
  const done = await agent.complete(600_000);
  const hydrateMs = Number(done['elapsedMs'] ?? Date.now() - t0);
  await waitReady(agent.child, 'agent', ep.uri, size, () => agent.stderr);
  return { server: { name: 'agent', pid: agent.child.pid!, uri: ep.uri, file: target, child: agent.child }, hydrateMs };
}

// ---------------------------------------------------------------- measuring

const CLK_TCK = 100; // USER_HZ: the unit of /proc/PID/stat times; 100 on every Linux ABI in use

/** utime + stime of the whole process (all threads), in seconds. */
function cpuSeconds(pid: number, name: string): number {
  let stat: string;
  try {
    stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  } catch {
    throw new Error(`${name} (pid ${pid}) is gone`);
  }
  // Fields after the parenthesised comm (which may contain spaces): state is field 3,
  // utime field 14, stime field 15.
  const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return (Number(f[11]) + Number(f[12])) / CLK_TCK;
}

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

/** Random bytes (no holes and nothing compressible, so no server can shortcut a read). */
function makeImage(file: string, size: number): void {
  const fd = fs.openSync(file, 'w');
  const chunk = Buffer.allocUnsafe(16 << 20);
  try {
    for (let off = 0; off < size; off += chunk.length) {
      crypto.randomFillSync(chunk);
      fs.writeSync(fd, chunk, 0, Math.min(chunk.length, size - off), off);
    }
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

/** fsync (so no writeback bleeds into a measured run), then read it all (so it is cached). */
function settleAndWarm(file: string): void {
  const fd = fs.openSync(file, 'r');
  const buf = Buffer.allocUnsafe(8 << 20);
  try {
    fs.fsyncSync(fd);
    let off = 0;
    let n: number;
    while ((n = fs.readSync(fd, buf, 0, buf.length, off)) > 0) off += n;
  } finally {
    fs.closeSync(fd);
  }
}

function flushFile(file: string): void {
  const fd = fs.openSync(file, 'r');
  try {
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

// ---------------------------------------------------------------- reporting

interface MachineInfo {
  nproc: number;
  cpuModel: string;
  kernel: string;
  memGiB: number;
  fio: string;
  nbdkit: string;
  qemuNbd: string;
  node: string;
}

async function machineInfo(): Promise<MachineInfo> {
  const first = async (cmd: string, args: string[]): Promise<string> => {
    const r = await run(cmd, args, { allowFail: true });
    return (r.stdout || r.stderr).split('\n')[0]!.trim();
  };
  const cpuinfo = fs.readFileSync('/proc/cpuinfo', 'utf8');
  return {
    nproc: os.availableParallelism(),
    cpuModel: /^model name\s*:\s*(.*)$/m.exec(cpuinfo)?.[1]?.trim() ?? 'unknown',
    kernel: `${os.type()} ${os.release()}`,
    memGiB: Math.round(os.totalmem() / 2 ** 30),
    fio: await first('fio', ['--version']),
    nbdkit: await first('nbdkit', ['--version']),
    qemuNbd: await first('qemu-nbd', ['--version']),
    node: process.version,
  };
}

/** The command as typed, including a `flock …` wrapper when there is one. */
function commandLine(): string {
  const self = ['node', path.relative(REPO, process.argv[1]!) || process.argv[1]!, ...process.argv.slice(2)].join(' ');
  try {
    const parent = fs.readFileSync(`/proc/${process.ppid}/cmdline`, 'utf8').split('\0').filter(Boolean);
    if (parent.length > 1 && path.basename(parent[0]!) === 'flock') {
      const lock = parent.slice(1).find((a) => !a.startsWith('-'));
      if (lock) return `flock ${lock} ${self}`;
    }
  } catch {
    // no parent to inspect: report the bench's own command
  }
  return self;
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

function fmtNum(n: number): string {
  if (!Number.isFinite(n)) return '–';
  return n >= 100 ? Math.round(n).toLocaleString('en-US') : n.toFixed(1);
}

function fmtBytes(n: number): string {
  return n >= 2 ** 30 ? `${n / 2 ** 30} GiB` : `${n / 2 ** 20} MiB`;
}

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
  const ratio = (a: number, b: number): string => (Number.isFinite(a / b) ? `${(a / b).toFixed(2)}×` : '–');
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

function renderSection(p: { opts: Options; cmd: string; date: string; m: MachineInfo; sum: Summary[]; hydrateMs: number; rawFile: string }): string {
  const { opts, m } = p;
  const transport = opts.tcp ? 'loopback TCP' : 'unix socket';
  return `${SECTION}

Generated by \`bench/hotpath.ts\`; re-run it to update this section (the rest of the file is
left alone).

- Command: \`${p.cmd}\`
- Date: ${p.date}
- Machine: ${m.nproc} × ${m.cpuModel}, ${m.memGiB} GiB RAM, ${m.kernel}; ${m.fio}, ${m.nbdkit}, ${m.qemuNbd}, node ${m.node}
- Setup: ${fmtBytes(opts.size)} of random data; each server serves its own copy of it (the
  agent its target file, hydrated from a local HTTP origin in ${(p.hydrateMs / 1000).toFixed(1)} s before
  measuring), page cache warm, ${transport}. fio \`--ioengine=nbd\`, one job, ${opts.runtime} s per run,
  ${opts.reps} round(s) with the servers interleaved; the table shows medians.
- Servers: \`dpu-agent stream … --listen ${opts.tcp ? 'tcp:…' : 'unix:SOCK'}\` (after \`complete\`),
  \`nbdkit -f ${opts.tcp ? '-i 127.0.0.1 -p PORT' : '-U SOCK'} file FILE\`,
  \`qemu-nbd -f raw -t -e 8 --cache=writeback --aio=threads ${opts.tcp ? '-b 127.0.0.1 -p PORT' : '-k SOCK'} FILE\`.
- CPU µs/op: the server process's utime+stime (all threads, /proc/PID/stat) over the run,
  divided by the operations fio completed. fio runs on the same 2 cores.
- Raw runs: \`${p.rawFile}\`

${renderTable(p.sum)}

<details><summary>Every run (round 1 / 2 / …)</summary>

${renderSpread(p.sum)}

</details>
`;
}

/** Replaces this bench's section (up to the next `## ` heading) or appends it. */
function updateDoc(section: string): void {
  if (!fs.existsSync(DOC)) {
    fs.mkdirSync(path.dirname(DOC), { recursive: true });
    fs.writeFileSync(DOC, `# Benchmarks\n\n${section}`);
    return;
  }
  const lines = fs.readFileSync(DOC, 'utf8').split('\n');
  const start = lines.findIndex((l) => l.trim() === SECTION);
  if (start < 0) {
    const text = lines.join('\n').replace(/\n*$/, '\n\n');
    fs.writeFileSync(DOC, text + section);
    return;
  }
  let end = lines.findIndex((l, i) => i > start && /^## /.test(l));
  if (end < 0) end = lines.length;
  const after = lines.slice(end).join('\n');
  fs.writeFileSync(DOC, [...lines.slice(0, start), ...section.replace(/\n+$/, '').split('\n'), ...(end < lines.length ? ['', after] : [''])].join('\n'));
}

// ---------------------------------------------------------------- main

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

async function main(): Promise<void> {
  const opts = parseOptions(process.argv.slice(2));
  const log = (s: string): void => console.error(s);
  const date = new Date();
  const m = await machineInfo();
  const cmd = commandLine();

  const dir = opts.workdir ?? fs.mkdtempSync(path.join(os.tmpdir(), 'hotpath-'));
  fs.mkdirSync(dir, { recursive: true });
  if (!opts.keep) workdirToRemove = dir;

  log(`hotpath: ${fmtBytes(opts.size)}, ${opts.runtime} s × ${opts.reps} round(s), ${opts.tcp ? 'tcp' : 'unix'}; work dir ${dir}`);
  const image = path.join(dir, 'image.raw');
  makeImage(image, opts.size);
  const copies: Record<'nbdkit' | 'qemu-nbd', string> = { nbdkit: path.join(dir, 'nbdkit.raw'), 'qemu-nbd': path.join(dir, 'qemu-nbd.raw') };
  for (const f of Object.values(copies)) fs.copyFileSync(image, f);

  const servers = {} as Record<ServerName, Server>;
  const { server: agent, hydrateMs } = await startAgent(image, dir, await endpoint(opts.tcp, dir, 'agent'), opts.size, log);
  servers.agent = agent;
  cleanups.push(() => stopChild(agent.child));
  for (const name of ['nbdkit', 'qemu-nbd'] as const) {
    const s = await startPeer(name, copies[name], await endpoint(opts.tcp, dir, name), opts.size);
    servers[name] = s;
    cleanups.push(() => stopChild(s.child));
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
  const stamp = date.toISOString().replace(/:/g, '-').replace(/\.\d+Z$/, 'Z');
  fs.mkdirSync(RESULTS_DIR, { recursive: true });
  const rawFile = path.join(RESULTS_DIR, `hotpath-${stamp}.json`);
  const rawRel = path.relative(REPO, rawFile);
  fs.writeFileSync(
    rawFile,
    JSON.stringify(
      {
        command: cmd,
        date: date.toISOString(),
        options: opts,
        machine: m,
        hydrateMs,
        workloads: WORKLOADS.map((w) => ({ ...w, fioArgs: fioArgs(w, '<URI>', opts.runtime) })),
        medians: sum.map((s) => ({ workload: s.workload.id, metric: s.workload.metric, value: s.value, cpuUsPerOp: s.cpu })),
        runs,
      },
      null,
      2,
    ) + '\n',
  );

  const section = renderSection({ opts, cmd, date: date.toISOString(), m, sum, hydrateMs, rawFile: rawRel });
  console.log(section);
  if (opts.docs) {
    updateDoc(section);
    log(`updated ${path.relative(REPO, DOC)}; raw runs in ${rawRel}`);
  } else {
    log(`raw runs in ${rawRel} (docs/benchmarks.md not touched${opts.quick ? ': --quick' : ''})`);
  }
}

main()
  .then(() => cleanupAll())
  .catch(async (err: unknown) => {
    if (interrupted) return; // the signal handler is already cleaning up and exiting
    console.error(`hotpath: ${(err as Error).stack ?? String(err)}`);
    await cleanupAll();
    process.exitCode = 1;
  });

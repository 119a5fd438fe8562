/**
 * What every benchmark here shares: child-process bookkeeping (every server is stopped by
 * PID however the bench ends), readiness polling of an NBD export, CPU and RSS readings
 * from /proc, the machine description, medians and percentiles, the markdown section
 * writer for docs/benchmarks.md, raw-result files, and PNG plots through gnuplot.
 *
 * A bench is a program: it parses its flags, measures, prints a markdown section, replaces
 * its own `## …` section of docs/benchmarks.md and writes its raw runs to bench/results/.
 */
import { spawn, spawnSync, type ChildProcess, type SpawnOptions } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { run } from '../../tests/helpers/run.js';

export const REPO = fileURLToPath(new URL('../../../', import.meta.url));
export const DOC = path.join(REPO, 'docs/benchmarks.md');
export const RESULTS_DIR = path.join(REPO, 'bench/results');
export const MiB = 2 ** 20;
export const GiB = 2 ** 30;

// ---------------------------------------------------------------- process bookkeeping

const children = new Set<ChildProcess>();
const cleanups: (() => Promise<void>)[] = [];
let workdirToRemove: string | null = null;
let interrupted = false;
let cleaningUp: Promise<void> | null = null;

/** Registers a child so it is killed by PID however the bench ends. */
export function track(child: ChildProcess): ChildProcess {
  children.add(child);
  child.once('exit', () => children.delete(child));
  return child;
}

/** Spawns and tracks; stderr (last 8 KiB) is kept for error messages. */
export function spawnTracked(cmd: string, args: string[], opts: SpawnOptions = {}): { child: ChildProcess; stderr: () => string } {
  const child = track(spawn(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'], ...opts }));
  let err = '';
  child.stderr?.setEncoding('utf8').on('data', (d: string) => (err = (err + d).slice(-8000)));
  child.once('error', (e) => (err += `\nspawn ${cmd}: ${e.message}`));
  return { child, stderr: () => err };
}

export async function stopChild(child: ChildProcess, graceMs = 5000): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  child.kill('SIGTERM');
  const timer = setTimeout(() => child.kill('SIGKILL'), graceMs);
  await exited;
  clearTimeout(timer);
}

/** Runs at the end (last registered first), before the remaining children are stopped. */
export function onCleanup(fn: () => Promise<void> | void): void {
  cleanups.push(async () => fn());
}

/** The work directory is removed only after every child is gone. */
export function removeAtEnd(dir: string): void {
  workdirToRemove = dir;
}

export function cleanupAll(): Promise<void> {
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

/**
 * Runs a bench's main with signal handling: SIGINT/SIGTERM/SIGHUP stop every child and
 * exit with the conventional code; an error is printed, children stopped, exit code 1.
 */
export function runMain(name: string, main: () => Promise<void>): void {
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
  main()
    .then(() => cleanupAll())
    .catch(async (err: unknown) => {
      if (interrupted) return; // the signal handler is already cleaning up and exiting
      console.error(`${name}: ${(err as Error).stack ?? String(err)}`);
      await cleanupAll();
      process.exitCode = 1;
    });
}

// ---------------------------------------------------------------- options

/** The flags every bench takes; spread into its parseArgs options. */
export const BENCH_FLAGS = {
  quick: { type: 'boolean' },
  workdir: { type: 'string' },
  keep: { type: 'boolean' },
  docs: { type: 'boolean' },
  'no-docs': { type: 'boolean' },
  help: { type: 'boolean' },
} as const;

export interface BenchFlags {
  quick: boolean;
  workdir: string | undefined;
  keep: boolean;
  /** Update docs/benchmarks.md: by default on a full run, not on a --quick one. */
  docs: boolean;
}

/** Prints the usage and exits on --help; returns the common flags' values. */
export function benchFlags(v: { quick?: boolean; workdir?: string; keep?: boolean; docs?: boolean; 'no-docs'?: boolean; help?: boolean }, usage: string): BenchFlags {
  if (v.help) {
    console.log(usage);
    process.exit(0);
  }
  const quick = v.quick === true;
  return { quick, workdir: v.workdir, keep: v.keep === true, docs: v['no-docs'] ? false : v.docs === true || !quick };
}

/** A positive number from a flag (`--name`), or the default when the flag is absent. */
export function positive(name: string, s: string | undefined, dflt: number, integer = false): number {
  if (s === undefined) return dflt;
  const n = Number(s);
  if (!Number.isFinite(n) || n <= 0 || (integer && !Number.isInteger(n))) throw new Error(`--${name} "${s}" is not a positive ${integer ? 'integer' : 'number'}`);
  return n;
}

/** "64K", "256M", "1G" (binary units) → bytes; `what` names the flag in the error. */
export function parseSizeArg(s: string, what: string): number {
  const m = /^(\d+)([KMG]?)(i?B)?$/i.exec(s.trim());
  if (!m) throw new Error(`${what} "${s}" is not a size like 64K, 256M or 1G`);
  return Number(m[1]) * 2 ** { '': 0, K: 10, M: 20, G: 30 }[m[2]!.toUpperCase() as '' | 'K' | 'M' | 'G'];
}

/** "1gbit", "500mbit" → bytes per second; `what` names the flag in the error. */
export function parseRateArg(s: string, what: string): number {
  const m = /^(\d+(?:\.\d+)?)([kmg]?)bit$/i.exec(s.trim());
  if (!m) throw new Error(`${what} "${s}" is not a rate like 1gbit or 500mbit`);
  const bits = Number(m[1]) * { '': 1, k: 1e3, m: 1e6, g: 1e9 }[m[2]!.toLowerCase() as '' | 'k' | 'm' | 'g'];
  if (!(bits > 0)) throw new Error(`${what} "${s}" must be above 0`);
  return bits / 8;
}

// ---------------------------------------------------------------- endpoints

export async function freePort(): Promise<number> {
  const srv = net.createServer();
  await new Promise<void>((resolve) => srv.listen(0, '127.0.0.1', resolve));
  const port = (srv.address() as net.AddressInfo).port;
  await new Promise<void>((resolve) => srv.close(() => resolve()));
  return port;
}

/** Polls with nbdinfo until the export answers with the expected size (or the server dies). */
export async function waitNbdReady(child: ChildProcess, name: string, uri: string, size: number, stderr: () => string, timeoutMs = 20_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
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
  throw new Error(`${name} did not answer on ${uri} within ${timeoutMs / 1000} s: ${last}; ${stderr().slice(-2000)}`);
}

// ---------------------------------------------------------------- /proc readings

const CLK_TCK = 100; // USER_HZ: the unit of /proc/PID/stat times; 100 on every Linux ABI in use

/** utime + stime of the whole process (all threads), in seconds. */
export function cpuSeconds(pid: number, name = `pid ${pid}`): number {
  let stat: string;
  try {
    stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  } catch {
    throw new Error(`${name} (pid ${pid}) is gone`);
  }
  // Fields after the parenthesised comm (which may contain spaces): utime is field 14,
  // stime field 15.
  const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return (Number(f[11]) + Number(f[12])) / CLK_TCK;
}

/**
 * A process's resident memory from /proc, in bytes: RSS now, its high-water mark (VmHWM;
 * reset by writing 5 to /proc/PID/clear_refs), and RSS now split into anonymous memory
 * (heap, buffers: what the process costs) and file-backed pages (the node binary and its
 * libraries: shared and reclaimable).
 */
export function rss(pid: number): { rss: number; hwm: number; anon: number; file: number } {
  const status = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
  const kib = (key: string): number => Number(new RegExp(`^${key}:\\s+(\\d+) kB`, 'm').exec(status)?.[1] ?? NaN) * 1024;
  return { rss: kib('VmRSS'), hwm: kib('VmHWM'), anon: kib('RssAnon'), file: kib('RssFile') };
}

/**
 * Samples a process's anonymous RSS every `everyMs` until stop(), which returns the peak
 * (/proc keeps a high-water mark of the whole RSS only).
 */
export function anonPeak(pid: number, everyMs = 50): { stop(): number } {
  let peak = 0;
  const sample = (): void => {
    try {
      peak = Math.max(peak, rss(pid).anon);
    } catch {
      // exited
    }
  };
  sample();
  const t = setInterval(sample, everyMs);
  t.unref();
  return {
    stop: () => {
      clearInterval(t);
      sample();
      return peak;
    },
  };
}

// ---------------------------------------------------------------- files

/** Random bytes (no holes and nothing compressible, so no server can shortcut a read). */
export function makeRandomImage(file: string, size: number, seed?: number): void {
  const fd = fs.openSync(file, 'w');
  const chunk = Buffer.allocUnsafe(16 * MiB);
  try {
    for (let off = 0, i = 0; off < size; off += chunk.length, i++) {
      if (seed === undefined) crypto.randomFillSync(chunk);
      else seededFill(chunk, seed + i);
      fs.writeSync(fd, chunk, 0, Math.min(chunk.length, size - off), off);
    }
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

/** Deterministic incompressible bytes: AES-CTR keystream of the seed. */
function seededFill(buf: Buffer, seed: number): void {
  const key = crypto.createHash('sha256').update(`bench-${seed}`).digest();
  const c = crypto.createCipheriv('aes-256-ctr', key, Buffer.alloc(16));
  const out = c.update(Buffer.alloc(buf.length));
  out.copy(buf);
}

/** fsync (so no writeback bleeds into a measured run), then read it all (so it is cached). */
export function settleAndWarm(file: string): void {
  const fd = fs.openSync(file, 'r');
  const buf = Buffer.allocUnsafe(8 * MiB);
  try {
    fs.fsyncSync(fd);
    let off = 0;
    let n: number;
    while ((n = fs.readSync(fd, buf, 0, buf.length, off)) > 0) off += n;
  } finally {
    fs.closeSync(fd);
  }
}

export function flushFile(file: string): void {
  const fd = fs.openSync(file, 'r');
  try {
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

/** Drops clean page-cache pages of one file (posix_fadvise DONTNEED through dd). */
export function dropFileCache(file: string): void {
  spawnSync('dd', [`if=${file}`, 'iflag=nocache', 'count=0', 'status=none']);
}

// ---------------------------------------------------------------- reporting

export interface MachineInfo {
  nproc: number;
  cpuModel: string;
  kernel: string;
  memGiB: number;
  node: string;
  tools: Record<string, string>;
}

/** The machine and the first line of `TOOL --version` for each tool named. */
export async function machineInfo(tools: string[]): Promise<MachineInfo> {
  const cpuinfo = fs.readFileSync('/proc/cpuinfo', 'utf8');
  const versions: Record<string, string> = {};
  for (const t of tools) {
    const r = await run(t, ['--version'], { allowFail: true });
    versions[t] = (r.stdout || r.stderr).split('\n')[0]!.trim();
  }
  return {
    nproc: os.availableParallelism(),
    cpuModel: /^model name\s*:\s*(.*)$/m.exec(cpuinfo)?.[1]?.trim() ?? 'unknown',
    kernel: `${os.type()} ${os.release()}`,
    memGiB: Math.round(os.totalmem() / GiB),
    node: process.version,
    tools: versions,
  };
}

export function describeMachine(m: MachineInfo): string {
  return `${m.nproc} × ${m.cpuModel}, ${m.memGiB} GiB RAM, ${m.kernel}; ${Object.values(m.tools).join(', ')}, node ${m.node}`;
}

/** The command as typed, including a `flock …` wrapper when there is one. */
export function commandLine(): string {
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

export function median(xs: number[]): number {
  if (!xs.length) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

/** Nearest-rank percentile (p in 0..100) of unsorted values. */
export function percentile(xs: number[], p: number): number {
  if (!xs.length) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.max(0, Math.ceil((p / 100) * s.length) - 1))]!;
}

export function fmtNum(n: number, digits = 1): string {
  if (!Number.isFinite(n)) return '–';
  return Math.abs(n) >= 100 ? Math.round(n).toLocaleString('en-US') : n.toFixed(digits);
}

export function fmtBytes(n: number): string {
  if (n >= GiB) return `${+(n / GiB).toFixed(2)} GiB`;
  if (n >= MiB) return `${+(n / MiB).toFixed(1)} MiB`;
  return `${+(n / 1024).toFixed(1)} KiB`;
}

export function ratio(a: number, b: number): string {
  return Number.isFinite(a / b) ? `${(a / b).toFixed(2)}×` : '–';
}

export function markdownTable(header: string[], align: ('l' | 'r')[], rows: string[][]): string {
  return [`| ${header.join(' | ')} |`, `|${align.map((a) => (a === 'r' ? '--:' : '---')).join('|')}|`, ...rows.map((r) => `| ${r.join(' | ')} |`)].join('\n');
}

/** ISO date usable in a file name. */
export function stamp(date: Date): string {
  return date.toISOString().replace(/:/g, '-').replace(/\.\d+Z$/, 'Z');
}

/** Writes bench/results/<name>-<date>.json and returns its path relative to the repo. */
export function writeResults(name: string, date: Date, data: unknown): string {
  fs.mkdirSync(RESULTS_DIR, { recursive: true });
  const file = path.join(RESULTS_DIR, `${name}-${stamp(date)}.json`);
  fs.writeFileSync(file, JSON.stringify(data, null, 2) + '\n');
  return path.relative(REPO, file);
}

/**
 * Replaces the section that starts with `heading` (up to the next `## ` heading) in
 * docs/benchmarks.md, or appends it; the rest of the file is left alone.
 */
export function updateDocSection(heading: string, section: string, opts: { top?: boolean } = {}): void {
  if (!fs.existsSync(DOC)) {
    fs.mkdirSync(path.dirname(DOC), { recursive: true });
    fs.writeFileSync(DOC, `# Benchmarks\n\n${section}`);
    return;
  }
  const lines = fs.readFileSync(DOC, 'utf8').split('\n');
  const start = lines.findIndex((l) => l.trim() === heading);
  if (start < 0 && opts.top) {
    // Right after the title and its intro, before the first section.
    let at = lines.findIndex((l) => /^## /.test(l));
    if (at < 0) at = lines.length;
    fs.writeFileSync(DOC, [...lines.slice(0, at), ...section.replace(/\n+$/, '').split('\n'), '', ...lines.slice(at)].join('\n'));
    return;
  }
  if (start < 0) {
    const text = lines.join('\n').replace(/\n*$/, '\n\n');
    fs.writeFileSync(DOC, text + section.replace(/\n*$/, '\n'));
    return;
  }
  let end = lines.findIndex((l, i) => i > start && /^## /.test(l));
  if (end < 0) end = lines.length;
  const after = lines.slice(end).join('\n');
  fs.writeFileSync(DOC, [...lines.slice(0, start), ...section.replace(/\n+$/, '').split('\n'), ...(end < lines.length ? ['', after] : [''])].join('\n'));
}

// ---------------------------------------------------------------- plots

export interface Series {
  title: string;
  points: [number, number][];
  /** gnuplot style, default `linespoints`. */
  style?: string;
}

export interface PlotSpec {
  /** File name under docs/, e.g. `bench-streaming-hydration.png`. */
  file: string;
  title: string;
  xlabel: string;
  ylabel: string;
  series: Series[];
  logx?: boolean;
  logy?: boolean;
  /** Extra gnuplot commands (e.g. xtics), placed before `plot`. */
  extra?: string[];
  /** Bar chart of one value per category: `series[i].points` = [[index, value]]; labels per index. */
  categories?: string[];
}

/**
 * Renders a PNG into docs/ with gnuplot (pngcairo). Returns the path relative to the repo,
 * or null when gnuplot is missing (the bench still writes its numbers; the message says
 * how to get plots).
 */
export function plot(spec: PlotSpec): string | null {
  const out = path.join(REPO, 'docs', spec.file);
  const esc = (s: string): string => s.replace(/\\/g, '\\\\').replace(/"/g, '\\"');
  const data = spec.series.map((s) => s.points.map(([x, y]) => `${x} ${y}`).join('\n') + '\ne').join('\n');
  const lines = [
    `set terminal pngcairo size 900,520 enhanced font "DejaVu Sans,11"`,
    `set output "${esc(out)}"`,
    `set title "${esc(spec.title)}"`,
    `set xlabel "${esc(spec.xlabel)}"`,
    `set ylabel "${esc(spec.ylabel)}"`,
    `set grid`,
    `set key outside right top`,
    ...(spec.logx ? ['set logscale x'] : []),
    ...(spec.logy ? ['set logscale y'] : []),
  ];
  if (spec.categories) {
    const n = spec.series.length;
    const width = 0.8 / n;
    lines.push(
      `set style fill solid 0.8 border -1`,
      `set boxwidth ${width.toFixed(3)}`,
      `set xtics (${spec.categories.map((c, i) => `"${esc(c)}" ${i}`).join(', ')})`,
      `set xrange [-0.6:${spec.categories.length - 0.4}]`,
      `set yrange [0:*]`,
    );
    lines.push(...(spec.extra ?? []));
    lines.push(`plot ${spec.series.map((s, i) => `"-" using ($1+${(-0.4 + width * (i + 0.5)).toFixed(3)}):2 with boxes title "${esc(s.title)}"`).join(', ')}`);
  } else {
    lines.push(...(spec.extra ?? []));
    lines.push(`plot ${spec.series.map((s) => `"-" using 1:2 with ${s.style ?? 'linespoints'} lw 2 title "${esc(s.title)}"`).join(', ')}`);
  }
  const r = spawnSync('gnuplot', [], { input: `${lines.join('\n')}\n${data}\n`, encoding: 'utf8' });
  if (r.error || r.status !== 0) {
    console.error(`plot ${spec.file}: gnuplot ${r.error ? 'is missing (apt-get install gnuplot-nox)' : `failed: ${r.stderr}`}`);
    return null;
  }
  return path.relative(REPO, out);
}

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

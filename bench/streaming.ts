/**
 * Streaming benchmark: the agent's `stream` against qemu-storage-daemon (qcow2 overlay +
 * copy-on-read + block-stream) and nbdkit curl with the cow and the cache filters
 * (hydrated by nbdcopy), all reading the same random image from the same nginx origin
 * across the same emulated link (netns + veth + tc tbf), in one run.
 *
 * One run of one peer on one link, and why it is shaped this way:
 *  1. The host veth's rx_bytes is read, then the server process is started (t0). The
 *     bench's own NBD client polls the unix socket and reads 4 KiB at offset 0 as soon as
 *     the export answers: time to first byte = t0 → that read's reply, which includes the
 *     server's start-up and its first trip to the origin.
 *  2. Hydration starts: the agent's is its own (it starts when the disk opens); the
 *     bench starts qemu-storage-daemon's `block-stream` job over QMP, and runs
 *     `nbdcopy --connections=1 URI null:` for the nbdkit peers, right after that first read.
 *  3. Cold reads: QD1 4 KiB reads at random offsets past the hydration frontier. Every
 *     peer hydrates front to back, and nothing it fetched lies past the bytes that crossed
 *     the link, so "past rx_bytes − rx0 + slack" is past what any peer holds — without
 *     asking the peer (the same rule for all of them). Stops at `--cold-samples` reads or
 *     when too little unfetched disk is left.
 *  4. Foreground throughput: a sequential QD1 1 MiB reader over the second half of the
 *     disk (ahead of the frontier) until hydration completes or it reaches the end.
 *  5. Hydration time = t0 → complete (agent's `complete` event, BLOCK_JOB_COMPLETED,
 *     nbdcopy's exit); wire bytes = rx_bytes after − before, every byte that crossed the
 *     link for this run, foreground reads included.
 *  Every byte read is compared with the image, so a fast wrong answer cannot win.
 *
 * Runs are interleaved per link (rep → peer, peer order rotated each rep) so drifts of the
 * shared machine fall on all peers alike. A run that fails or hangs (qemu-storage-daemon
 * 7.2 hangs now and then, PEERS.md) is recorded as failed, its server killed by PID, and
 * the bench goes on; medians are over the runs that finished.
 *
 * Run it under the machine's heavy-work lock: `flock /tmp/heavy.lock node dist/bench/streaming.js`.
 */
import { spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { parseArgs } from 'node:util';
import { EmulatedLink } from '../lab/netns.js';
import { AgentProcess } from '../tests/helpers/agent.js';
import { run } from '../tests/helpers/run.js';
import { issue, makeCa } from '../tests/helpers/tls-certs.js';
import {
  BENCH_FLAGS,
  MiB,
  benchFlags,
  parseRateArg,
  parseSizeArg,
  positive,
  commandLine,
  cpuSeconds,
  describeMachine,
  fmtBytes,
  fmtNum,
  machineInfo,
  makeRandomImage,
  markdownTable,
  median,
  onCleanup,
  percentile,
  plot,
  ratio,
  removeAtEnd,
  runMain,
  settleAndWarm,
  sleep,
  spawnTracked,
  stopChild,
  track,
  updateDocSection,
  writeResults,
  type MachineInfo,
} from './lib/common.js';
import { startNginxOrigin } from './lib/nginx-origin.js';
import { NbdClient, QmpClient } from './lib/streaming-clients.js';

const SECTION = '## Streaming over an emulated link';
const SECTION_TLS = '## Streaming from an https origin';
/** EmulatedLink indexes reserved for this bench (other benches and the lab use others). */
const LINK_INDEX_FIRST = 40;
const LINK_INDEX_LAST = 47;

// ---------------------------------------------------------------- options

const USAGE = `Usage: node dist/bench/streaming.js [options]   (run it under: flock /tmp/heavy.lock …)

  --links LIST        emulated link rates, e.g. 1gbit,10gbit or 500mbit (default 1gbit,10gbit)
  --size SIZE         image size, e.g. 1G or 256M (default 1G; 128M with --quick)
  --reps N            runs of every peer on every link (default 3; 1 with --quick)
  --cold-samples N    cold 4K reads per run at most (default 200)
  --peers LIST        a subset of agent,qsd,nbdkit-cow,nbdkit-cache (default all)
  --agent-args ARGS   also run the agent with these extra stream flags as peer "agent+",
                      e.g. --agent-args="--batch-size 32M --hydrate-connections 4"
  --no-foreground     hydration alone: no cold reads, no foreground reader (for diagnosis)
  --tls               the origin serves https (nginx, a throw-away CA that every peer is
                      given): peers agent, nbdkit-cow, nbdkit-cache (qemu-storage-daemon's
                      https driver trusts the system CA store only); its own docs section
                      and results (streaming-tls-*.json)
  --quick             smoke run: 128 MiB, 1 rep; docs/benchmarks.md left alone unless --docs
  --workdir DIR       where the image and the peers' files go (default: a fresh temp dir)
  --keep              keep the work directory
  --docs              update docs/benchmarks.md (and its plots) even with --quick
  --no-docs           do not touch docs/benchmarks.md or the plots
  --help`;

const ALL_PEERS = ['agent', 'qsd', 'nbdkit-cow', 'nbdkit-cache'] as const;
type PeerName = (typeof ALL_PEERS)[number] | 'agent+';

const PEER_LABEL: Record<PeerName, string> = {
  agent: 'agent',
  'agent+': 'agent (tuned)',
  qsd: 'qemu-storage-daemon',
  'nbdkit-cow': 'nbdkit cow',
  'nbdkit-cache': 'nbdkit cache',
};

interface LinkSpec {
  name: string;
  /** Bytes per second. */
  rate: number;
}

interface Options {
  links: LinkSpec[];
  size: number;
  reps: number;
  coldSamples: number;
  peers: PeerName[];
  agentArgs: string[];
  foreground: boolean;
  tls: boolean;
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
      links: { type: 'string' },
      size: { type: 'string' },
      reps: { type: 'string' },
      'cold-samples': { type: 'string' },
      peers: { type: 'string' },
      'agent-args': { type: 'string' },
      'no-foreground': { type: 'boolean' },
      tls: { type: 'boolean' },
      ...BENCH_FLAGS,
    },
  });
  const common = benchFlags(v, USAGE);
  const quick = common.quick;
  const num = (name: string, s: string | undefined, dflt: number): number => positive(name, s, dflt, true);
  const links = (v.links ?? '1gbit,10gbit').split(',').map((s) => parseRate(s.trim()));
  if (links.length > LINK_INDEX_LAST - LINK_INDEX_FIRST + 1) throw new Error(`--links: at most ${LINK_INDEX_LAST - LINK_INDEX_FIRST + 1} links`);
  const tls = v.tls === true;
  const peers = (v.peers ?? (tls ? 'agent,nbdkit-cow,nbdkit-cache' : ALL_PEERS.join(','))).split(',').map((s) => s.trim());
  if (tls && peers.includes('qsd')) throw new Error("--tls: qemu-storage-daemon's https driver trusts only the system CA store; leave qsd out of --peers");
  for (const p of peers) if (!(ALL_PEERS as readonly string[]).includes(p)) throw new Error(`--peers: unknown peer "${p}" (known: ${ALL_PEERS.join(', ')})`);
  const agentArgs = v['agent-args']?.trim().split(/\s+/).filter(Boolean) ?? [];
  return {
    links,
    size: parseSize(v.size ?? (quick ? '128M' : '1G')),
    reps: num('reps', v.reps, quick ? 1 : 3),
    coldSamples: num('cold-samples', v['cold-samples'], 200),
    peers: [...(peers as PeerName[]), ...(agentArgs.length ? (['agent+'] as const) : [])],
    agentArgs,
    foreground: v['no-foreground'] !== true,
    tls,
    ...common,
  };
}

function parseRate(s: string): LinkSpec {
  return { name: s.toLowerCase(), rate: parseRateArg(s, '--links:') };
}

function parseSize(s: string): number {
  const n = parseSizeArg(s, '--size');
  if (n < 64 * MiB || n % MiB !== 0) throw new Error('--size must be a whole number of MiB, at least 64M');
  return n;
}

// ---------------------------------------------------------------- origin

// ---------------------------------------------------------------- peers

/** A started peer: its export, the process to measure, and its hydration. */
interface Peer {
  pid: number;
  socket: string;
  exportName: string;
  child: ChildProcess;
  /** Starts hydration where the bench drives it; resolves (performance.now()) when complete. */
  hydrate(deadlineMs: number): Promise<number>;
  stop(): Promise<void>;
  stderr(): string;
}

interface PeerContext {
  url: string;
  size: number;
  rundir: string;
  agentArgs: string[];
  /** With an https origin: the CA certificate (PEM file) its certificate chains to. */
  ca?: string;
}

/** The peers' command lines as the report shows them. */
function peerCommands(agentArgs: string[]): Record<PeerName, string> {
  return {
    agent: 'dpu-agent stream --source URL --target FILE --state DIR --listen unix:SOCK --progress json (defaults otherwise)',
    'agent+': `dpu-agent stream … ${agentArgs.join(' ')}`,
    qsd:
      'qemu-img create -f qcow2 -u -b URL -F raw overlay.qcow2 SIZE; qemu-storage-daemon with blockdevs http (readahead 0, timeout 30) → raw → qcow2 overlay → copy-on-read, NBD export of the copy-on-read node; QMP block-stream job-id s0 device ovl',
    'nbdkit-cow': 'nbdkit -f -U SOCK --filter=cow curl url=URL timeout=30 cow-on-read=true; nbdcopy --connections=1 URI null:',
    'nbdkit-cache': 'nbdkit -f -U SOCK --filter=cache curl url=URL timeout=30 cache-on-read=true cache=writeback; nbdcopy --connections=1 URI null:',
  };
}

async function startPeer(name: PeerName, ctx: PeerContext): Promise<Peer> {
  const socket = path.join(ctx.rundir, 'nbd.sock');
  switch (name) {
    case 'agent':
    case 'agent+': {
      const agent = new AgentProcess({
        source: ctx.url,
        target: path.join(ctx.rundir, 'target.raw'),
        state: path.join(ctx.rundir, 'state'),
        socket,
        extra: name === 'agent+' ? ctx.agentArgs : [],
        poison: false, // a test build's guard, not what a deployment runs
        ...(ctx.ca ? { env: { NODE_EXTRA_CA_CERTS: ctx.ca } } : {}),
      });
      track(agent.child);
      // Attached now so the event is not missed whatever the bench is doing when it comes.
      let done: Promise<number> | null = null;
      const hydrate = (deadlineMs: number): Promise<number> => (done ??= agent.complete(deadlineMs).then(() => performance.now()));
      return {
        pid: agent.child.pid!,
        socket,
        exportName: 'disk',
        child: agent.child,
        hydrate,
        stop: () => stopChild(agent.child),
        stderr: () => agent.stderr,
      };
    }
    case 'qsd': {
      const overlay = path.join(ctx.rundir, 'overlay.qcow2');
      const qmpSock = path.join(ctx.rundir, 'qmp.sock');
      await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-u', '-b', ctx.url, '-F', 'raw', overlay, String(ctx.size)]);
      const http = { driver: 'http', 'node-name': 'base-http', url: ctx.url, readahead: 0, timeout: 30, 'read-only': true };
      const { child, stderr } = spawnTracked('qemu-storage-daemon', [
        '--blockdev', JSON.stringify(http),
        '--blockdev', JSON.stringify({ driver: 'raw', 'node-name': 'base', file: 'base-http', 'read-only': true }),
        '--blockdev', JSON.stringify({ driver: 'file', 'node-name': 'ovl-file', filename: overlay }),
        '--blockdev', JSON.stringify({ driver: 'qcow2', 'node-name': 'ovl', file: 'ovl-file', backing: 'base' }),
        '--blockdev', JSON.stringify({ driver: 'copy-on-read', 'node-name': 'cor', file: 'ovl' }),
        '--nbd-server', `addr.type=unix,addr.path=${socket}`,
        '--export', 'type=nbd,id=e0,node-name=cor,name=disk,writable=on',
        '--chardev', `socket,id=qmp0,path=${qmpSock},server=on,wait=off`,
        '--monitor', 'chardev=qmp0',
      ]);
      let qmp: QmpClient | null = null;
      const hydrate = async (deadlineMs: number): Promise<number> => {
        qmp = await QmpClient.connect(qmpSock);
        await qmp.execute('block-stream', { 'job-id': 's0', device: 'ovl' });
        const ev = await qmp.waitEvent((e) => e.event === 'BLOCK_JOB_COMPLETED' || e.event === 'BLOCK_JOB_ERROR', deadlineMs);
        if (ev.event === 'BLOCK_JOB_ERROR' || ev.data?.['error']) throw new Error(`block-stream failed: ${JSON.stringify(ev.data)}`);
        return performance.now();
      };
      return {
        pid: child.pid!,
        socket,
        exportName: 'disk',
        child,
        hydrate,
        stop: async () => {
          qmp?.close();
          await stopChild(child, 3000);
        },
        stderr,
      };
    }
    case 'nbdkit-cow':
    case 'nbdkit-cache': {
      const curl = ['curl', `url=${ctx.url}`, 'timeout=30', ...(ctx.ca ? [`cainfo=${ctx.ca}`] : [])];
      const filter = name === 'nbdkit-cow' ? ['--filter=cow', ...curl, 'cow-on-read=true'] : ['--filter=cache', ...curl, 'cache-on-read=true', 'cache=writeback'];
      // The filters keep their overlay/cache in $TMPDIR: the run's directory.
      const { child, stderr } = spawnTracked('nbdkit', ['-f', '-U', socket, ...filter], { env: { ...process.env, TMPDIR: ctx.rundir } });
      let copier: ChildProcess | null = null;
      const hydrate = async (deadlineMs: number): Promise<number> => {
        const c = spawnTracked('nbdcopy', ['--connections=1', `nbd+unix:///?socket=${socket}`, 'null:']);
        copier = c.child;
        const code = await new Promise<number | string | null>((resolve) => {
          const timer = setTimeout(() => resolve('timeout'), deadlineMs);
          c.child.once('exit', (code, sig) => {
            clearTimeout(timer);
            resolve(code ?? sig);
          });
        });
        if (code === 'timeout') throw new Error(`nbdcopy did not finish within ${deadlineMs / 1000} s (hang)`);
        if (code !== 0) throw new Error(`nbdcopy exited ${String(code)}: ${c.stderr().slice(-1000)}`);
        return performance.now();
      };
      return {
        pid: child.pid!,
        socket,
        exportName: '',
        child,
        hydrate,
        stop: async () => {
          if (copier) await stopChild(copier, 2000);
          await stopChild(child, 3000);
        },
        stderr,
      };
    }
  }
}

// ---------------------------------------------------------------- one run

interface RunRecord {
  link: string;
  peer: PeerName;
  rep: number;
  startedAt: string;
  /** 1-minute load average when the run started: the machine is shared. */
  loadavg: number;
  ok: boolean;
  /** Why the run failed; `hang` when a deadline passed with the peer still running. */
  failure?: string;
  hang?: boolean;
  /** Process start → the export answered the handshake. */
  readyMs?: number;
  ttfbMs?: number;
  coldMs?: number[];
  coldP50Ms?: number;
  coldP99Ms?: number;
  hydrationMs?: number;
  /** Image bytes / link rate, as a share of the measured hydration time. */
  pctOfLink?: number;
  fgBytes?: number;
  fgMs?: number;
  fgMBps?: number;
  wireBytes?: number;
  wirePerImage?: number;
  serverCpuS?: number;
}

/** Reads the image's bytes to compare against what a peer answered. */
class ImageCheck {
  private readonly fd: number;
  private readonly buf = Buffer.allocUnsafe(MiB);
  constructor(file: string) {
    this.fd = fs.openSync(file, 'r');
  }
  check(offset: number, got: Buffer, who: string): void {
    const want = this.buf.subarray(0, got.length);
    fs.readSync(this.fd, want, 0, got.length, offset);
    if (!want.equals(got)) throw new Error(`${who} returned wrong bytes at ${offset}+${got.length}`);
  }
}

async function connectWhenReady(peer: Peer, name: string, timeoutMs: number): Promise<NbdClient> {
  const deadline = performance.now() + timeoutMs;
  let last = '';
  for (;;) {
    if (peer.child.exitCode !== null || peer.child.signalCode !== null) throw new Error(`${name} exited (${peer.child.exitCode ?? peer.child.signalCode}): ${peer.stderr().slice(-2000)}`);
    try {
      return await NbdClient.connect(peer.socket, peer.exportName, 5000);
    } catch (err) {
      last = (err as Error).message;
    }
    if (performance.now() > deadline) throw new Error(`${name} did not answer on ${peer.socket} within ${timeoutMs / 1000} s: ${last}; ${peer.stderr().slice(-2000)}`);
    await sleep(2);
  }
}

/**
 * How far past the bytes that crossed the link a cold read must land: the requests a
 * peer has in flight (the agent 2 × 8 MiB, nbdcopy 64 × 256 KiB) plus what the link
 * carries while the read is on its way.
 */
function coldSlack(rate: number): number {
  return 32 * MiB + Math.round(rate * 0.05);
}

async function measureRun(name: PeerName, link: EmulatedLink, spec: LinkSpec, rep: number, opts: Options, url: string, dir: string, img: ImageCheck, ca: string | undefined): Promise<RunRecord> {
  const size = opts.size;
  const rec: RunRecord = { link: spec.name, peer: name, rep, startedAt: new Date().toISOString(), loadavg: os.loadavg()[0]!, ok: false };
  const rundir = fs.mkdtempSync(path.join(dir, `${name}-`));
  const hydrateDeadlineMs = 30_000 + Math.round((5 * size * 1000) / spec.rate);
  let peer: Peer | null = null;
  let client: NbdClient | null = null;
  try {
    const rx0 = link.rxBytes();
    const t0 = performance.now();
    peer = await startPeer(name, { url, size, rundir, agentArgs: opts.agentArgs, ...(ca ? { ca } : {}) });
    const p = peer;

    // 1. time to first byte
    client = await connectWhenReady(p, name, 30_000);
    rec.readyMs = performance.now() - t0;
    if (client.size !== size) throw new Error(`${name} exports ${client.size} bytes, expected ${size}`);
    const first = await client.read(0, 4096);
    rec.ttfbMs = performance.now() - t0;
    img.check(0, first, name);

    // 2. hydration
    let doneAt = 0;
    let hydrationError: Error | null = null;
    const hydrated = p.hydrate(hydrateDeadlineMs).then(
      (t) => void (doneAt = t),
      (err: Error) => void (hydrationError = err),
    );
    const running = (): boolean => doneAt === 0 && hydrationError === null;

    // 3. cold 4K reads past the frontier
    const slack = coldSlack(spec.rate);
    const cold: number[] = [];
    while (opts.foreground && cold.length < opts.coldSamples && running()) {
      const lo = link.rxBytes() - rx0 + slack;
      if (lo > size - 16 * MiB) break;
      const off = Math.floor((lo + Math.random() * (size - lo - 4096)) / 4096) * 4096;
      const ts = performance.now();
      const buf = await client.read(off, 4096);
      cold.push(performance.now() - ts);
      img.check(off, buf, name);
    }
    rec.coldMs = cold;
    rec.coldP50Ms = percentile(cold, 50);
    rec.coldP99Ms = percentile(cold, 99);

    // 4. sequential 1 MiB reader ahead of the frontier
    if (opts.foreground && running()) {
      const start = Math.ceil(Math.max(link.rxBytes() - rx0 + slack, size / 2) / MiB) * MiB;
      const ts = performance.now();
      let off = start;
      while (running() && off < size) {
        const n = Math.min(MiB, size - off);
        const buf = await client.read(off, n);
        img.check(off, buf, name);
        off += n;
      }
      rec.fgBytes = off - start;
      rec.fgMs = performance.now() - ts;
      if (rec.fgBytes > 0) rec.fgMBps = rec.fgBytes / 1e6 / (rec.fgMs / 1000);
    }

    // 5. hydration complete, wire bytes
    await hydrated;
    if (hydrationError) throw hydrationError;
    rec.hydrationMs = doneAt - t0;
    rec.pctOfLink = (100 * (size / spec.rate) * 1000) / rec.hydrationMs;
    rec.wireBytes = link.rxBytes() - rx0;
    rec.wirePerImage = rec.wireBytes / size;
    rec.serverCpuS = cpuSeconds(p.pid, name);
    // Correctness after hydration: a read now is served locally by every peer.
    const tail = size - 4096;
    img.check(tail, await client.read(tail, 4096), name);
    rec.ok = true;
  } catch (err) {
    const msg = (err as Error).message;
    rec.failure = msg;
    rec.hang = /within|no answer|hang/i.test(msg);
  } finally {
    client?.close();
    if (peer) {
      // A hung qemu-storage-daemon may ignore SIGTERM: stopChild escalates to SIGKILL.
      await peer.stop();
    }
    fs.rmSync(rundir, { recursive: true, force: true });
  }
  return rec;
}

// ---------------------------------------------------------------- summary

interface PeerSummary {
  peer: PeerName;
  runs: number;
  ok: number;
  hangs: number;
  readyMs: number;
  ttfbMs: number;
  coldP50Ms: number;
  coldP99Ms: number;
  coldSamples: number;
  hydrationS: number;
  pctOfLink: number;
  fgMBps: number;
  wirePerImage: number;
  serverCpuS: number;
}

function summarize(runs: RunRecord[], link: string, peers: PeerName[]): PeerSummary[] {
  return peers.map((peer) => {
    const all = runs.filter((r) => r.link === link && r.peer === peer);
    const ok = all.filter((r) => r.ok);
    const med = (f: (r: RunRecord) => number | undefined): number => median(ok.map(f).filter((x): x is number => x !== undefined && Number.isFinite(x)));
    return {
      peer,
      runs: all.length,
      ok: ok.length,
      hangs: all.filter((r) => r.hang).length,
      readyMs: med((r) => r.readyMs),
      ttfbMs: med((r) => r.ttfbMs),
      coldP50Ms: med((r) => r.coldP50Ms),
      coldP99Ms: med((r) => r.coldP99Ms),
      coldSamples: med((r) => r.coldMs?.length),
      hydrationS: med((r) => (r.hydrationMs ?? NaN) / 1000),
      pctOfLink: med((r) => r.pctOfLink),
      fgMBps: med((r) => r.fgMBps),
      wirePerImage: med((r) => r.wirePerImage),
      serverCpuS: med((r) => r.serverCpuS),
    };
  });
}

function renderLinkTable(sum: PeerSummary[]): string {
  const agent = sum.find((s) => s.peer === 'agent');
  const others = sum.filter((s) => s.peer !== 'agent' && s.peer !== 'agent+');
  const rows: [string, (s: PeerSummary) => number, (n: number) => string, boolean][] = [
    ['export answering (ms)', (s) => s.readyMs, (n) => fmtNum(n), true],
    ['time to first byte (ms)', (s) => s.ttfbMs, (n) => fmtNum(n), true],
    ['cold 4K read p50 (ms)', (s) => s.coldP50Ms, (n) => fmtNum(n, 2), true],
    ['cold 4K read p99 (ms)', (s) => s.coldP99Ms, (n) => fmtNum(n, 2), true],
    ['cold reads per run', (s) => s.coldSamples, (n) => fmtNum(n, 0), false],
    ['hydration time (s)', (s) => s.hydrationS, (n) => fmtNum(n, 2), true],
    ['hydration, % of link rate', (s) => s.pctOfLink, (n) => fmtNum(n, 1), true],
    ['foreground 1 MiB seq. read during hydration (MB/s)', (s) => s.fgMBps, (n) => fmtNum(n, 1), true],
    ['wire bytes / image', (s) => s.wirePerImage, (n) => fmtNum(n, 3), true],
    ['server CPU (s)', (s) => s.serverCpuS, (n) => fmtNum(n, 2), true],
  ];
  const header = ['metric', ...sum.map((s) => PEER_LABEL[s.peer]), ...(agent ? others.map((o) => `agent ÷ ${PEER_LABEL[o.peer]}`) : [])];
  const body = rows.map(([label, f, fmt, withRatio]) => [
    label,
    ...sum.map((s) => fmt(f(s))),
    ...(agent ? others.map((o) => (withRatio ? ratio(f(agent), f(o)) : '')) : []),
  ]);
  body.push(['runs finished / started (hangs)', ...sum.map((s) => `${s.ok}/${s.runs}${s.hangs ? ` (${s.hangs} hung)` : ''}`), ...(agent ? others.map(() => '') : [])]);
  return markdownTable(header, header.map((_, i) => (i === 0 ? 'l' : 'r')), body);
}

function renderRuns(runs: RunRecord[]): string {
  const rows = runs.map((r) => [
    r.link,
    PEER_LABEL[r.peer],
    String(r.rep),
    r.ok ? 'ok' : `**failed**${r.hang ? ' (hang)' : ''}: ${(r.failure ?? '').replace(/\|/g, '/').replace(/\s+/g, ' ').slice(0, 160)}`,
    fmtNum(r.ttfbMs ?? NaN),
    fmtNum(r.coldP50Ms ?? NaN, 2),
    fmtNum(r.coldP99Ms ?? NaN, 2),
    String(r.coldMs?.length ?? '–'),
    fmtNum((r.hydrationMs ?? NaN) / 1000, 2),
    fmtNum(r.pctOfLink ?? NaN, 1),
    fmtNum(r.fgMBps ?? NaN, 1),
    fmtNum(r.wirePerImage ?? NaN, 3),
  ]);
  return markdownTable(
    ['link', 'peer', 'rep', 'result', 'TTFB ms', 'cold p50 ms', 'cold p99 ms', 'cold n', 'hydration s', '% of link', 'fg MB/s', 'wire/image'],
    ['l', 'l', 'r', 'l', 'r', 'r', 'r', 'r', 'r', 'r', 'r', 'r'],
    rows,
  );
}

interface Goals {
  /** Agent hydration time as % of image bytes / link rate, 1 Gbit/s, with a foreground client reading. */
  agentHydrationPctOfLink1g: number | null;
  /** Bytes that crossed the link / image size, agent, 1 Gbit/s link (foreground reads included). */
  agentWireBytesPerImage1g: number | null;
  /** p99 of cold 4K QD1 reads during hydration, agent, 1 Gbit/s, ms. */
  agentColdP99Ms1g: number | null;
}

function goalsOf(summaries: Record<string, PeerSummary[]>, links: LinkSpec[]): Goals {
  const g1 = links.find((l) => Math.abs(l.rate - 125e6) < 1);
  const a = g1 ? summaries[g1.name]?.find((s) => s.peer === 'agent') : undefined;
  const v = (n: number | undefined): number | null => (n !== undefined && Number.isFinite(n) ? n : null);
  return { agentHydrationPctOfLink1g: v(a?.pctOfLink), agentWireBytesPerImage1g: v(a?.wirePerImage), agentColdP99Ms1g: v(a?.coldP99Ms) };
}

function renderSection(p: {
  opts: Options;
  cmd: string;
  date: string;
  m: MachineInfo;
  summaries: Record<string, PeerSummary[]>;
  runs: RunRecord[];
  rawFile: string;
  plots: string[];
  goals: Goals;
}): string {
  const { opts } = p;
  const cmds = peerCommands(opts.agentArgs);
  const failed = p.runs.filter((r) => !r.ok);
  const hangNotes = failed.length
    ? failed.map((r) => `- ${PEER_LABEL[r.peer]} on ${r.link}, rep ${r.rep}: ${r.hang ? 'hung — ' : ''}${(r.failure ?? '').replace(/\s+/g, ' ').slice(0, 300)}`).join('\n')
    : '- None: every run finished.';
  const fmtGoal = (n: number | null, d: number, unit: string): string => (n === null ? '–' : `${n.toFixed(d)}${unit}`);
  const tables = opts.links
    .map((l) => `### ${l.name} (${fmtNum(l.rate / 1e6, 0)} MB/s; link-rate limit for the image ${((opts.size / l.rate)).toFixed(2)} s)\n\n${renderLinkTable(p.summaries[l.name]!)}`)
    .join('\n\n');
  return `${opts.tls ? SECTION_TLS : SECTION}

Generated by \`bench/streaming.ts${opts.tls ? ' --tls' : ''}\`; re-run it to update this section (the rest of the file is
left alone).

- Command: \`${p.cmd}\`
- Date: ${p.date}
- Machine: ${describeMachine(p.m)}
- Setup: ${fmtBytes(opts.size)} of random data served by nginx (${opts.tls ? 'https with a certificate of a throw-away CA that every peer trusts (agent: NODE_EXTRA_CA_CERTS; nbdkit curl: cainfo), TLS as nginx and each client negotiate it, no sendfile' : 'sendfile'}, Range, one worker)
  inside a network namespace, bound to the namespace address only; the peers run in the
  root namespace and reach it across a veth pair shaped with \`tc tbf\` on both ends
  (burst ≈ 1 ms of traffic), MTU 1500. Every peer exports over a unix socket; the bench's
  own NBD client (QD1) does the foreground reads. ${opts.reps} run(s) per peer per link,
  interleaved, peer order rotated; the tables show medians of the runs that finished.
- Peers:
${(opts.peers as PeerName[]).map((n) => `  - ${PEER_LABEL[n]}: \`${cmds[n]}\``).join('\n')}
- qemu-storage-daemon's http driver runs with \`"readahead":0\` (its 256 KiB default turns each
  512 KiB stream chunk into a 768 KiB GET). Every step of a run has a deadline (hydration:
  30 s + 5 × the link-rate time); a run past one is killed by PID and counted as hung.
- Metrics: *export answering* = server process start → NBD handshake done; *time to first
  byte* = server process start → first 4 KiB read of offset 0 answered; *cold 4K reads* = QD1 reads at random offsets past the hydration frontier
  (the bytes that crossed the link + ${fmtBytes(coldSlack(opts.links[0]!.rate))} or more), while hydration runs,
  up to ${opts.coldSamples} per run; *foreground read* = sequential QD1 1 MiB reads from the middle of
  the disk (ahead of the frontier) after the cold reads, until hydration completes;
  *hydration time* = process start → the agent's \`complete\` event / BLOCK_JOB_COMPLETED /
  nbdcopy's exit, with those foreground readers running; *% of link rate* = (image bytes ÷
  link rate) ÷ hydration time (at MTU 1500 TCP payload tops out at ≈ 95.6% of the tbf rate,
  which counts headers); *wire bytes* = the host veth's rx_bytes over the run (HTTP and
  TCP/IP headers included; veth carries GSO super-packets, so per-segment headers are
  counted once per super-packet); *server CPU* = utime+stime of the server process
  (nbdcopy's own CPU not included). Every byte read is checked against the image.
- Ratios are agent ÷ peer: below 1× is better for times, latencies, wire bytes and CPU;
  above 1× for % of link and MB/s.
- Raw runs: \`${p.rawFile}\`${p.plots.length ? `; plots: ${p.plots.map((f) => `\`${f}\``).join(', ')}` : ''}

Issue goals (1 Gbit/s link): agent hydration ${fmtGoal(p.goals.agentHydrationPctOfLink1g, 1, '% of link rate')} with a foreground
client reading; agent wire bytes / image ${fmtGoal(p.goals.agentWireBytesPerImage1g, 3, '')}; agent cold 4K p99 ${fmtGoal(p.goals.agentColdP99Ms1g, 2, ' ms')}.

${tables}

Failed and hung runs:

${hangNotes}
${p.plots.map((f) => `\n![${path.basename(f, '.png')}](${path.relative('docs', f)})`).join('\n')}

<details><summary>Every run</summary>

${renderRuns(p.runs)}

</details>
`;
}

function makePlots(opts: Options, summaries: Record<string, PeerSummary[]>): string[] {
  const cats = opts.links.map((l) => l.name);
  const series = (f: (s: PeerSummary) => number): { title: string; points: [number, number][] }[] =>
    opts.peers.map((peer) => ({
      title: PEER_LABEL[peer],
      points: opts.links.map((l, i): [number, number] => {
        const v = f(summaries[l.name]!.find((s) => s.peer === peer)!);
        return [i, Number.isFinite(v) ? v : 0];
      }),
    }));
  const out = [
    plot({ file: `${opts.tls ? 'bench-streaming-tls-' : 'bench-streaming-'}hydration.png`, title: `Hydration of ${fmtBytes(opts.size)} with a foreground reader (median)`, xlabel: 'link', ylabel: '% of link rate', series: series((s) => s.pctOfLink), categories: cats }),
    plot({ file: `${opts.tls ? 'bench-streaming-tls-' : 'bench-streaming-'}cold-p99.png`, title: 'Cold 4K QD1 read p99 during hydration (median of runs)', xlabel: 'link', ylabel: 'ms', series: series((s) => s.coldP99Ms), categories: cats }),
    plot({ file: `${opts.tls ? 'bench-streaming-tls-' : 'bench-streaming-'}foreground.png`, title: 'Sequential 1 MiB QD1 reader during hydration (median)', xlabel: 'link', ylabel: 'MB/s', series: series((s) => s.fgMBps), categories: cats }),
  ];
  return out.filter((f): f is string => f !== null);
}

// ---------------------------------------------------------------- main

async function main(): Promise<void> {
  const opts = parseOptions(process.argv.slice(2));
  const log = (s: string): void => console.error(s);
  if (process.getuid?.() !== 0) throw new Error('needs root (network namespaces, tc)');
  const date = new Date();
  const m = await machineInfo(['nginx', 'qemu-storage-daemon', 'nbdkit', 'nbdcopy']);
  m.tools['nginx'] = (spawnSync('nginx', ['-v'], { encoding: 'utf8' }).stderr ?? '').trim();
  const cmd = commandLine();

  const dir = opts.workdir ?? fs.mkdtempSync(path.join(os.tmpdir(), 'streaming-'));
  fs.mkdirSync(dir, { recursive: true });
  if (!opts.keep) removeAtEnd(dir);
  const imageDir = path.join(dir, 'origin');
  fs.mkdirSync(imageDir, { recursive: true });
  const image = path.join(imageDir, 'disk.raw');
  log(`streaming: ${fmtBytes(opts.size)}, links ${opts.links.map((l) => l.name).join(', ')}, ${opts.reps} rep(s), peers ${opts.peers.join(', ')}; work dir ${dir}`);
  makeRandomImage(image, opts.size);
  settleAndWarm(image);
  const img = new ImageCheck(image);

  const runs: RunRecord[] = [];
  const nginxConfigs: string[] = [];
  // A throw-away CA for an https origin; each link's server certificate names its address.
  const tlsCa = opts.tls ? await makeCa(fs.mkdtempSync(path.join(dir, 'ca-')), 'streaming bench CA') : undefined;
  for (const [li, spec] of opts.links.entries()) {
    const link = EmulatedLink.create({ index: LINK_INDEX_FIRST + li, rate: spec.rate });
    let origin: { child: ChildProcess } | null = null;
    // Registered before the origin starts: on any ending, nginx is stopped by PID, then
    // the namespace and veth are deleted.
    const teardown = async (): Promise<void> => {
      if (origin) await stopChild(origin.child);
      await link.destroy();
    };
    onCleanup(teardown);
    const serverCert = tlsCa ? await issue(fs.mkdtempSync(path.join(dir, 'tls-')), tlsCa, 'server', link.nsAddr, `IP:${link.nsAddr}`) : undefined;
    const o = await startNginxOrigin(link, dir, path.dirname(image), opts.tls ? 8443 : 8080, serverCert);
    const url = `${o.base}/${path.basename(image)}`;
    origin = o;
    nginxConfigs.push(o.config);
    log(`  ${spec.name}: ${link.ns} ${link.hostIf}↔${link.nsIf}, origin ${url} (nginx pid ${o.child.pid})`);
    for (let rep = 1; rep <= opts.reps; rep++) {
      const order = opts.peers.map((_, i) => opts.peers[(i + rep - 1) % opts.peers.length]!);
      for (const name of order) {
        const r = await measureRun(name, link, spec, rep, opts, url, dir, img, tlsCa?.cert);
        runs.push(r);
        log(
          r.ok
            ? `  ${spec.name} rep ${rep} ${name.padEnd(12)} ready/ttfb ${fmtNum(r.readyMs!)}/${fmtNum(r.ttfbMs!)} ms, cold p50/p99 ${fmtNum(r.coldP50Ms!, 2)}/${fmtNum(r.coldP99Ms!, 2)} ms (n=${r.coldMs!.length}), hydration ${fmtNum(r.hydrationMs! / 1000, 2)} s = ${fmtNum(r.pctOfLink!)}% of link, fg ${fmtNum(r.fgMBps ?? NaN)} MB/s, wire ${fmtNum(r.wirePerImage!, 3)}× image, cpu ${fmtNum(r.serverCpuS!, 2)} s`
            : `  ${spec.name} rep ${rep} ${name.padEnd(12)} FAILED${r.hang ? ' (hang)' : ''}: ${r.failure}`,
        );
        await sleep(500);
      }
    }
    await teardown();
  }

  const summaries: Record<string, PeerSummary[]> = {};
  for (const l of opts.links) summaries[l.name] = summarize(runs, l.name, opts.peers);
  const goals = goalsOf(summaries, opts.links);
  const rawFile = writeResults(opts.tls ? 'streaming-tls' : 'streaming', date, {
    command: cmd,
    date: date.toISOString(),
    options: opts,
    machine: m,
    setup: { peers: peerCommands(opts.agentArgs), qsdHttpReadahead: 0, nginxConfig: nginxConfigs[0], coldSlackBytes: Object.fromEntries(opts.links.map((l) => [l.name, coldSlack(l.rate)])) },
    summary: { goals, perLink: summaries },
    runs,
  });
  const plots = opts.docs ? makePlots(opts, summaries) : [];
  const section = renderSection({ opts, cmd, date: date.toISOString(), m, summaries, runs, rawFile, plots, goals });
  console.log(section);
  if (opts.docs) {
    updateDocSection(opts.tls ? SECTION_TLS : SECTION, section);
    log(`updated docs/benchmarks.md; raw runs in ${rawFile}`);
  } else {
    log(`raw runs in ${rawFile} (docs/benchmarks.md not touched${opts.quick ? ': --quick' : ''})`);
  }
}

runMain('streaming', main);

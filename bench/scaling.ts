/**
 * Scaling benchmark: what the agent costs as disks grow, and what the region size does to
 * hydration.
 *
 * 1. Disk size (1 GiB to 100 GiB, sparse). Each image holds the same amount of data
 *    (`--data`, random bytes in 4 MiB pieces spread over the disk) and zeros elsewhere, so
 *    what changes between sizes is the number of regions the agent tracks, not the bytes
 *    it copies. The agent streams it with a manifest (as the driver always hands it one),
 *    so zero regions are neither fetched nor written. Each image is streamed twice: by
 *    `dpu-agent stream` and by the daemon as deployed (`serve` with AGENT_NODE_FLAGS, one
 *    disk made through its API). Measured from /proc: RSS once the process listens, peak
 *    RSS (VmHWM) from start through hydration, then over 3 s of fio 4K random reads at
 *    QD32 against the hydrated export; anonymous RSS sampled every 50 ms over both; RSS
 *    20 s later, idle; CPU seconds of the whole run; hydration time. The goal:
 *    RSS of `serve` ≤ 64 MiB for a 100 GiB disk.
 * 2. Region size (64 KiB to 16 MiB): a 1 GiB random image across an emulated 1 Gbit/s link
 *    (netns + veth + tc tbf, origin inside the namespace): hydration time, rate as a share
 *    of the link, agent CPU, region map size. Medians of `--reps` runs.
 *
 * Run it under the machine's heavy-work lock: `flock /tmp/heavy.lock node dist/bench/scaling.js`.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { Manifest } from '../image-access/src/manifest.js';
import { EmulatedLink } from '../lab/netns.js';
import { AgentClient } from '../openapi/clients/agent-client.js';
import { AgentProcess } from '../tests/helpers/agent.js';
import { AGENT_NODE_FLAGS, agentDaemon, TOKEN } from '../tests/helpers/services.js';
import { TestOrigin } from '../tests/helpers/origin.js';
import { FileSource } from '../tests/helpers/qcow2-images.js';
import { run } from '../tests/helpers/run.js';
import {
  BENCH_FLAGS,
  anonPeak,
  GiB,
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
  plot,
  removeAtEnd,
  rss,
  runMain,
  sleep,
  stopChild,
  track,
  updateDocSection,
  writeResults,
} from './lib/common.js';

const SECTION = '## Scaling: agent CPU and memory against disk size, hydration against region size';
const LINK_INDEX = 60;
/** How long an idle agent is left before its settled RSS is read. */
const SETTLE_MS = 20_000;

const USAGE = `Usage: node dist/bench/scaling.js [options]   (run it under: flock /tmp/heavy.lock …)

  --sizes LIST      disk sizes for part 1 (default 1G,10G,100G)
  --data SIZE       non-zero bytes in every part-1 image (default 256M)
  --regions LIST    region sizes for part 2 (default 64K,256K,1M,4M,16M)
  --image SIZE      part-2 image size (default 1G)
  --link RATE       part-2 link rate, e.g. 1gbit (default 1gbit)
  --reps N          part-2 runs per region size (default 3)
  --quick           smoke run: sizes 1G,4G, data 64M, regions 256K,1M,4M, image 256M, 1 rep;
                    docs/benchmarks.md is left alone unless --docs
  --only PART       sizes | regions
  --workdir DIR     where images and targets go (default: a fresh directory in the OS temp dir)
  --keep            keep the work directory
  --docs / --no-docs
  --help`;

interface Options {
  sizes: number[];
  data: number;
  regions: number[];
  image: number;
  linkBps: number;
  linkLabel: string;
  reps: number;
  quick: boolean;
  only: 'sizes' | 'regions' | undefined;
  workdir: string | undefined;
  keep: boolean;
  docs: boolean;
}

function parseOptions(argv: string[]): Options {
  const { values: v } = parseArgs({
    args: argv,
    strict: true,
    options: { ...BENCH_FLAGS, sizes: { type: 'string' }, data: { type: 'string' }, regions: { type: 'string' }, image: { type: 'string' }, link: { type: 'string' }, reps: { type: 'string' }, only: { type: 'string' } },
  });
  const common = benchFlags(v, USAGE);
  const quick = common.quick;
  const list = (s: string, what: string): number[] => s.split(',').map((x) => parseSizeArg(x, what));
  if (v.only !== undefined && v.only !== 'sizes' && v.only !== 'regions') throw new Error(`--only "${v.only}" must be sizes or regions`);
  const regions = list(v.regions ?? (quick ? '256K,1M,4M' : '64K,256K,1M,4M,16M'), '--regions');
  for (const r of regions) if (r < 4096 || (r & (r - 1)) !== 0) throw new Error(`--regions: ${r} is not a power of two of at least 4K`);
  const reps = positive('reps', v.reps, quick ? 1 : 3, true);
  const link = v.link ?? '1gbit';
  return {
    sizes: list(v.sizes ?? (quick ? '1G,4G' : '1G,10G,100G'), '--sizes'),
    data: parseSizeArg(v.data ?? (quick ? '64M' : '256M'), '--data'),
    regions,
    image: parseSizeArg(v.image ?? (quick ? '256M' : '1G'), '--image'),
    linkBps: parseRateArg(link, '--link'),
    linkLabel: link,
    reps,
    only: v.only as Options['only'],
    ...common,
  };
}

// ---------------------------------------------------------------- part 1: disk size

interface SizeRun {
  /** `stream` (one disk, as the benches run it) or `serve` (the daemon as deployed, one disk made through its API). */
  program: 'stream' | 'serve';
  /** node's flags: serve runs with the deployed ones (AGENT_NODE_FLAGS). */
  nodeFlags: string[];
  size: number;
  regions: number;
  dataBytes: number;
  manifestMs: number;
  listenMs: number;
  rssListening: number;
  rssHydrationPeak: number;
  rssFioPeak: number;
  /** Anonymous RSS (heap, buffers; not the node binary's file pages): once listening, peaks sampled every 50 ms. */
  anonListening: number;
  anonHydrationPeak: number;
  anonFioPeak: number;
  /** RSS and anonymous RSS SETTLE_MS after fio, the process idle. */
  rssSettled: number;
  anonSettled: number;
  hydrateMs: number;
  cpuHydrateS: number;
  cpuTotalS: number;
  bytesFetched: number;
  fioIops: number;
  stateBytes: number;
}

/** A sparse image: `data` random bytes in 4 MiB pieces spread evenly, zeros elsewhere. */
function makeSparseImage(file: string, size: number, data: number): void {
  const piece = 4 * MiB;
  const pieces = Math.max(1, Math.floor(data / piece));
  const stride = Math.floor(size / pieces / MiB) * MiB;
  const fd = fs.openSync(file, 'w');
  try {
    fs.ftruncateSync(fd, size);
    const tmp = path.join(path.dirname(file), 'piece.tmp');
    for (let i = 0; i < pieces; i++) {
      makeRandomImage(tmp, piece, 1000 + i);
      fs.writeSync(fd, fs.readFileSync(tmp), 0, piece, i * stride);
    }
    fs.rmSync(tmp);
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

function dirBytes(dir: string): number {
  let n = 0;
  for (const e of fs.readdirSync(dir, { withFileTypes: true })) {
    const p = path.join(dir, e.name);
    n += e.isDirectory() ? dirBytes(p) : fs.statSync(p).size;
  }
  return n;
}

async function fioIops(uri: string, seconds: number): Promise<number> {
  const r = await run('fio', ['--name=scale', '--ioengine=nbd', `--uri=${uri}`, '--rw=randread', '--bs=4k', '--iodepth=32', `--runtime=${seconds}`, '--time_based', '--norandommap', '--output-format=json'], { timeoutMs: (seconds + 60) * 1000 });
  const doc = JSON.parse(r.stdout.slice(r.stdout.indexOf('{'))) as { jobs: { read: { iops: number } }[] };
  return doc.jobs[0]!.read.iops;
}

async function measureSize(dir: string, size: number, data: number, log: (s: string) => void): Promise<SizeRun[]> {
  const image = path.join(dir, `sparse-${size}.raw`);
  const manifestFile = `${image}.manifest`;
  makeSparseImage(image, size, data);
  const t0 = Date.now();
  const src = new FileSource(image, 8 * MiB);
  const manifest = await Manifest.build(src, { regionSize: MiB, imageHashAlgo: 'sha256' });
  await src.close();
  fs.writeFileSync(manifestFile, manifest.encode());
  const manifestMs = Date.now() - t0;
  log(`  ${fmtBytes(size)}: manifest in ${(manifestMs / 1000).toFixed(1)} s (${manifest.count - manifest.zeroRegions} data regions of ${manifest.count})`);

  const origin = new TestOrigin({ file: image });
  const url = await origin.start();
  const common = { size, regions: manifest.count, dataBytes: (manifest.count - manifest.zeroRegions) * MiB, manifestMs };
  try {
    return [await measureStream(dir, url, manifestFile, common), await measureServe(dir, url, manifest, common)];
  } finally {
    await origin.stop();
    for (const f of [image, manifestFile]) fs.rmSync(f, { force: true });
  }
}

type SizeCommon = Pick<SizeRun, 'size' | 'regions' | 'dataBytes' | 'manifestMs'>;

/** Memory and CPU of one agent process from listening to hydrated, then under fio. */
async function measureProcess(pid: number, sock: string, listening: { rss: number; anon: number }, hydrated: () => Promise<{ hydrateMs: number; bytesFetched: number }>): Promise<Omit<SizeRun, keyof SizeCommon | 'program' | 'nodeFlags' | 'listenMs' | 'stateBytes'>> {
  let anon = anonPeak(pid);
  let done: { hydrateMs: number; bytesFetched: number };
  let anonHydrationPeak: number;
  try {
    done = await hydrated();
  } finally {
    anonHydrationPeak = anon.stop();
  }
  const rssHydrationPeak = rss(pid).hwm;
  const cpuHydrateS = cpuSeconds(pid, 'agent');
  // Reset the high-water mark (clear_refs 5), so the fio peak is its own.
  fs.writeFileSync(`/proc/${pid}/clear_refs`, '5');
  anon = anonPeak(pid);
  let fioIopsMeasured: number;
  let anonFioPeak: number;
  try {
    fioIopsMeasured = await fioIops(`nbd+unix:///?socket=${sock}`, 3);
  } finally {
    anonFioPeak = anon.stop();
  }
  const rssFioPeak = rss(pid).hwm;
  const cpuTotalS = cpuSeconds(pid, 'agent');
  // What the process keeps once idle: the fetch buffers and the heap's garbage go only with
  // a full collection, which V8's memory reducer runs some seconds after allocation stops,
  // on its own schedule (in some runs it had not within SETTLE_MS).
  await sleep(SETTLE_MS);
  const settled = rss(pid);
  return { rssListening: listening.rss, rssHydrationPeak, rssFioPeak, anonListening: listening.anon, anonHydrationPeak, anonFioPeak, rssSettled: settled.rss, anonSettled: settled.anon, hydrateMs: done.hydrateMs, cpuHydrateS, cpuTotalS, bytesFetched: done.bytesFetched, fioIops: fioIopsMeasured };
}

/** `dpu-agent stream --manifest`, node's default flags (as the other benches run it). */
async function measureStream(dir: string, url: string, manifestFile: string, common: SizeCommon): Promise<SizeRun> {
  const { size } = common;
  const state = path.join(dir, `state-${size}`);
  const target = path.join(dir, `target-${size}.raw`);
  const sock = path.join(dir, `scale-${size}.sock`);
  const started = Date.now();
  // No bandwidth cap and the default settings: what an operator runs.
  const agent = new AgentProcess({ source: url, target, state, socket: sock, extra: ['--manifest', manifestFile], poison: false });
  track(agent.child);
  try {
    await agent.listening(120_000);
    const listenMs = Date.now() - started;
    const m = await measureProcess(agent.child.pid!, sock, rss(agent.child.pid!), async () => {
      const done = await agent.complete(1_800_000);
      return { hydrateMs: Number(done['elapsedMs']), bytesFetched: Number(done['bytesFetched']) };
    });
    return { program: 'stream', nodeFlags: [], ...common, listenMs, ...m, stateBytes: dirBytes(state) };
  } finally {
    await stopChild(agent.child);
    fs.rmSync(target, { force: true });
    fs.rmSync(state, { recursive: true, force: true });
  }
}

/**
 * `dpu-agent serve` as deployed (AGENT_NODE_FLAGS), one disk created through its API: made
 * with hydration paused, given the manifest, then resumed (what the driver does), polled
 * every 200 ms until complete.
 */
async function measureServe(dir: string, url: string, manifest: Manifest, common: SizeCommon): Promise<SizeRun> {
  const { size } = common;
  const home = path.join(dir, `serve-${size}`);
  const started = Date.now();
  const agent = await agentDaemon({ dir: home });
  try {
    await agent.start(120_000);
    track(agent.child!);
    const listenMs = Date.now() - started;
    const pid = agent.child!.pid!;
    const listening = rss(pid);
    const api = new AgentClient({ baseUrl: agent.url, token: TOKEN });
    const disk = await api.createDisk({ id: 'scale', source: { url }, target: { path: path.join(home, 'targets', 'scale.raw') }, region_size: MiB, hydration: { paused: true } });
    await api.setManifest('scale', manifest.encode());
    const sock = disk.export.socket;
    if (!sock) throw new Error(`serve: the disk's export has no unix socket: ${JSON.stringify(disk.export)}`);
    const m = await measureProcess(pid, sock, listening, async () => {
      const t = Date.now();
      const deadline = t + 1_800_000;
      await api.updateHydration('scale', { paused: false });
      for (;;) {
        const d = await api.getDisk('scale');
        if (d.state === 'failed' || d.hydration.state === 'failed') throw new Error(`serve: the disk failed: ${d.last_error ?? ''}`);
        if (d.regions.local === d.regions.total) return { hydrateMs: Date.now() - t, bytesFetched: d.bytes_fetched };
        if (Date.now() > deadline) throw new Error(`serve: not hydrated within 30 min (${d.regions.local} of ${d.regions.total} regions local)`);
        await sleep(200);
      }
    });
    return { program: 'serve', nodeFlags: [...AGENT_NODE_FLAGS], ...common, listenMs, ...m, stateBytes: dirBytes(path.join(home, 'state')) };
  } finally {
    if (agent.child) await stopChild(agent.child);
    await agent.stop();
    fs.rmSync(home, { recursive: true, force: true });
  }
}

// ---------------------------------------------------------------- part 2: region size

interface RegionRun {
  regionSize: number;
  rep: number;
  hydrateMs: number;
  linkShare: number;
  cpuS: number;
  stateBytes: number;
  bytesFetched: number;
}

async function startNamespacedOrigin(link: EmulatedLink, image: string): Promise<string> {
  const child = link.spawnInside(process.execPath, [path.join(path.dirname(new URL(import.meta.url).pathname), '../lab/origin-server.js'), '--file', image, '--host', link.nsAddr, '--port', '8080']);
  track(child);
  let out = '';
  let err = '';
  child.stderr!.setEncoding('utf8').on('data', (d: string) => (err += d));
  return await new Promise<string>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`origin did not start: ${err}`)), 15_000);
    child.stdout!.setEncoding('utf8').on('data', (d: string) => {
      out += d;
      const m = /"url":"([^"]+)"/.exec(out);
      if (m) {
        clearTimeout(timer);
        resolve(m[1]!);
      }
    });
    child.once('exit', (c) => reject(new Error(`origin exited (${c}): ${err}`)));
  });
}

async function measureRegion(dir: string, url: string, regionSize: number, rep: number, imageSize: number, linkBps: number): Promise<RegionRun> {
  const state = path.join(dir, `rstate-${regionSize}-${rep}`);
  const target = path.join(dir, `rtarget-${regionSize}-${rep}.raw`);
  const sock = path.join(dir, `region-${regionSize}.sock`);
  const agent = new AgentProcess({ source: url, target, state, socket: sock, extra: ['--region-size', String(regionSize)], poison: false });
  track(agent.child);
  try {
    await agent.listening(60_000);
    const done = await agent.complete(600_000);
    const hydrateMs = Number(done['elapsedMs']);
    return {
      regionSize,
      rep,
      hydrateMs,
      linkShare: imageSize / (hydrateMs / 1000) / linkBps,
      cpuS: cpuSeconds(agent.child.pid!, 'agent'),
      stateBytes: dirBytes(state),
      bytesFetched: Number(done['bytesFetched']),
    };
  } finally {
    await stopChild(agent.child);
    fs.rmSync(target, { force: true });
    fs.rmSync(state, { recursive: true, force: true });
  }
}

// ---------------------------------------------------------------- main

async function main(): Promise<void> {
  const opts = parseOptions(process.argv.slice(2));
  const log = (s: string): void => console.error(s);
  const date = new Date();
  const m = await machineInfo(['fio']);
  const cmd = commandLine();
  const dir = opts.workdir ?? fs.mkdtempSync(path.join(os.tmpdir(), 'scaling-'));
  fs.mkdirSync(dir, { recursive: true });
  if (!opts.keep) removeAtEnd(dir);

  const sizeRuns: SizeRun[] = [];
  if (opts.only !== 'regions') {
    log(`scaling part 1: disk sizes ${opts.sizes.map(fmtBytes).join(', ')}, ${fmtBytes(opts.data)} of data each`);
    for (const size of opts.sizes) {
      for (const r of await measureSize(dir, size, opts.data, log)) {
        sizeRuns.push(r);
        log(`  ${fmtBytes(size)} ${r.program}: RSS ${fmtBytes(r.rssListening)} listening, peak ${fmtBytes(r.rssHydrationPeak)} hydrating (${fmtBytes(r.anonHydrationPeak)} anonymous), ${fmtBytes(r.rssFioPeak)} under fio; CPU ${r.cpuTotalS.toFixed(1)} s; hydrated in ${(r.hydrateMs / 1000).toFixed(1)} s`);
      }
    }
  }

  const regionRuns: RegionRun[] = [];
  if (opts.only !== 'sizes') {
    log(`scaling part 2: region sizes ${opts.regions.map(fmtBytes).join(', ')} over ${opts.linkLabel}, ${fmtBytes(opts.image)} image, ${opts.reps} rep(s)`);
    const image = path.join(dir, 'region-image.raw');
    makeRandomImage(image, opts.image, 7);
    const link = EmulatedLink.create({ index: LINK_INDEX, rate: opts.linkBps });
    onCleanup(() => link.destroy());
    const url = await startNamespacedOrigin(link, image);
    for (let rep = 1; rep <= opts.reps; rep++) {
      for (const rs of opts.regions) {
        const r = await measureRegion(dir, url, rs, rep, opts.image, opts.linkBps);
        regionRuns.push(r);
        log(`  rep ${rep} region ${fmtBytes(rs).padEnd(9)} ${(r.hydrateMs / 1000).toFixed(1)} s, ${(r.linkShare * 100).toFixed(1)}% of the link, CPU ${r.cpuS.toFixed(1)} s`);
        await sleep(300);
      }
    }
  }

  const regionSummary = opts.regions.map((rs) => {
    const mine = regionRuns.filter((r) => r.regionSize === rs);
    return {
      regionSize: rs,
      hydrateMs: median(mine.map((r) => r.hydrateMs)),
      linkShare: median(mine.map((r) => r.linkShare)),
      cpuS: median(mine.map((r) => r.cpuS)),
      stateBytes: median(mine.map((r) => r.stateBytes)),
      spread: mine.map((r) => (r.hydrateMs / 1000).toFixed(1)).join(' / '),
    };
  });
  // The goal is the daemon's (the issue: `dpu-agent serve` with one disk hydrating), as deployed.
  const serveRuns = sizeRuns.filter((r) => r.program === 'serve');
  const largest = serveRuns.at(-1) ?? sizeRuns.at(-1);
  const peakRss = largest ? Math.max(largest.rssHydrationPeak, largest.rssFioPeak) : NaN;
  const goals = {
    rssLargestDisk: largest
      ? {
          size: largest.size,
          program: largest.program,
          nodeFlags: largest.nodeFlags,
          peakRss,
          peakAnon: Math.max(largest.anonHydrationPeak, largest.anonFioPeak),
          goal: 64 * MiB,
          met: peakRss <= 64 * MiB,
        }
      : null,
  };
  const rawRel = writeResults('scaling', date, { command: cmd, date: date.toISOString(), options: opts, machine: m, sizeRuns, regionRuns, regionSummary, goals });

  const pngs: string[] = [];
  if (opts.docs) {
    if (sizeRuns.length) {
      const p = plot({
        file: 'bench-scaling-rss.png',
        title: 'Agent memory against disk size (sparse images, same data)',
        xlabel: 'disk size (GiB)',
        ylabel: 'RSS (MiB)',
        logx: true,
        series: [
          ...(['serve', 'stream'] as const).flatMap((program) => {
            const rs = sizeRuns.filter((r) => r.program === program);
            return rs.length
              ? [
                  { title: `${program}: listening`, points: rs.map((r): [number, number] => [r.size / GiB, r.rssListening / MiB]) },
                  { title: `${program}: peak while hydrating`, points: rs.map((r): [number, number] => [r.size / GiB, r.rssHydrationPeak / MiB]) },
                  { title: `${program}: peak anonymous while hydrating`, points: rs.map((r): [number, number] => [r.size / GiB, r.anonHydrationPeak / MiB]) },
                ]
              : [];
          }),
          { title: 'goal (64 MiB)', points: sizeRuns.map((r): [number, number] => [r.size / GiB, 64]), style: 'lines dt 2' },
        ],
        extra: ['set yrange [0:*]'],
      });
      if (p) pngs.push(p);
    }
    if (regionRuns.length) {
      const p = plot({
        file: 'bench-scaling-region.png',
        title: `Hydration over an emulated ${opts.linkLabel} link against region size`,
        xlabel: 'region size (KiB)',
        ylabel: '% of the link rate',
        logx: true,
        series: [{ title: 'agent, median', points: regionSummary.map((s) => [s.regionSize / 1024, s.linkShare * 100]) }],
        extra: ['set yrange [0:100]'],
      });
      if (p) pngs.push(p);
    }
  }

  const section = renderSection({ opts, cmd, date, m: describeMachine(m), sizeRuns, regionSummary, rawRel, pngs });
  console.log(section);
  if (opts.docs) {
    updateDocSection(SECTION, section);
    log(`updated docs/benchmarks.md; raw runs in ${rawRel}`);
  } else {
    log(`raw runs in ${rawRel} (docs/benchmarks.md not touched)`);
  }
}

function renderSection(p: {
  opts: Options;
  cmd: string;
  date: Date;
  m: string;
  sizeRuns: SizeRun[];
  regionSummary: { regionSize: number; hydrateMs: number; linkShare: number; cpuS: number; stateBytes: number; spread: string }[];
  rawRel: string;
  pngs: string[];
}): string {
  const { opts } = p;
  const out = [
    SECTION,
    '',
    'Generated by `bench/scaling.ts`; re-run it to update this section.',
    '',
    `- Command: \`${p.cmd}\``,
    `- Date: ${p.date.toISOString()}`,
    `- Machine: ${p.m}`,
    `- Raw runs: \`${p.rawRel}\``,
    '',
  ];
  if (p.sizeRuns.length) {
    out.push(
      `**Disk size.** Sparse images holding ${fmtBytes(opts.data)} of random data in 4 MiB pieces spread over the disk, zeros elsewhere; 1 MiB regions; streamed from a local origin with the image's manifest (zero regions are neither fetched nor written), at full speed (no cap, nothing else running). Each image is streamed twice: by \`dpu-agent stream --manifest\` with node's default flags, and by the daemon as deployed, \`node ${AGENT_NODE_FLAGS.join(' ')} … serve\`, one disk created through its API (hydration paused, the manifest uploaded, then resumed, as the driver does; the API polled every 200 ms). RSS from /proc: VmRSS once listening (before any disk); VmHWM from start through hydration and over 3 s of fio 4K random reads at QD32 on the hydrated export; anonymous RSS (RssAnon: heap and buffers, without the file-backed pages of the node binary and its libraries, which are shared and reclaimable) sampled every 50 ms; and both again ${SETTLE_MS / 1000} s after fio, the agent idle (whether V8's memory reducer has run a full collection by then is V8's choice: in some runs it had not). CPU = utime+stime of the agent over the whole run. Hydration time: the agent's own for \`stream\` (its \`complete\` event), from the resume to the first poll that saw every region local for \`serve\`. Goal: RSS ≤ 64 MiB for a 100 GiB disk (\`serve\`).`,
      '',
      markdownTable(
        ['disk', 'program', 'regions', 'RSS listening (anon)', 'peak RSS hydrating (anon)', 'peak RSS under fio (anon)', `RSS idle ${SETTLE_MS / 1000} s later (anon)`, 'agent CPU (s)', 'hydration (s)', 'fetched', 'state dir', 'fio 4K QD32 IOPS'],
        ['l', 'l', 'r', 'r', 'r', 'r', 'r', 'r', 'r', 'r', 'r', 'r'],
        p.sizeRuns.map((r) => [
          fmtBytes(r.size),
          r.program,
          r.regions.toLocaleString('en-US'),
          `${fmtBytes(r.rssListening)} (${fmtBytes(r.anonListening)})`,
          `${fmtBytes(r.rssHydrationPeak)} (${fmtBytes(r.anonHydrationPeak)})`,
          `${fmtBytes(r.rssFioPeak)} (${fmtBytes(r.anonFioPeak)})`,
          `${fmtBytes(r.rssSettled)} (${fmtBytes(r.anonSettled)})`,
          r.cpuTotalS.toFixed(1),
          (r.hydrateMs / 1000).toFixed(1),
          fmtBytes(r.bytesFetched),
          fmtBytes(r.stateBytes),
          fmtNum(r.fioIops),
        ]),
      ),
      '',
    );
    const png = p.pngs.find((f) => f.includes('rss'));
    if (png) out.push(`![agent RSS against disk size](${path.relative('docs', png)})`, '');
  }
  if (p.regionSummary.length && p.regionSummary.some((s) => Number.isFinite(s.hydrateMs))) {
    out.push(
      `**Region size.** A ${fmtBytes(opts.image)} random image behind an emulated ${opts.linkLabel} link (netns + veth + \`tc tbf\`; the Node origin of \`lab/origin-server.ts\` inside the namespace); \`dpu-agent stream --region-size R\` with every other setting at its default, no host I/O; medians of ${opts.reps} run(s).`,
      '',
      markdownTable(
        ['region size', 'hydration (s)', '% of link rate', 'agent CPU (s)', 'state dir', 'runs (s)'],
        ['l', 'r', 'r', 'r', 'r', 'l'],
        p.regionSummary.map((s) => [fmtBytes(s.regionSize), (s.hydrateMs / 1000).toFixed(1), `${(s.linkShare * 100).toFixed(1)}%`, s.cpuS.toFixed(1), fmtBytes(s.stateBytes), s.spread]),
      ),
      '',
    );
    const png = p.pngs.find((f) => f.includes('region'));
    if (png) out.push(`![hydration against region size](${path.relative('docs', png)})`, '');
  }
  return out.join('\n');
}

runMain('scaling', main);

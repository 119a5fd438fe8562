/**
 * Origin fault torture of the streaming disk (issue #8): the real disk, wired by
 * openStreamingDisk (HttpSource → StreamingDisk → Hydrator, region map and target on
 * disk), in process, against a TestOrigin that misbehaves at random. Timeouts are cut to
 * milliseconds so that a fault costs little; readers issue random reads concurrently with
 * hydration. Two kinds of trial:
 *
 *   faults   every ranged GET may get a fault (5xx, reset, truncated body, 200 for 206,
 *            wrong Content-Range, stall, and — when the disk has a manifest — a corrupted
 *            byte), never more in a row for one read than its retry deadline absorbs:
 *            no read may fail, and the agent's counters must account for every fault
 *            (one retry per fault but a 200-for-206; one integrity failure per corruption);
 *   outages  the origin goes down (connections reset, or the port refused) for windows
 *            shorter than the retry deadline (invisible to readers) and longer (reads may
 *            fail, but only inside the window and only after retrying for about the
 *            deadline); when it comes back, reads succeed again.
 *
 * In every trial every byte any read returns is compared with the image, and hydration
 * must complete with the target equal to the image.
 *
 * Run outside CI:  node dist/tests/torture/origin-torture.js --faults 10000
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { DpuError } from '../../image-access/src/errors.js';
import { Manifest } from '../../image-access/src/manifest.js';
import { openStreamingDisk } from '../../dpu-agent/src/streaming/open.js';
import { type Fault, FAULT_KINDS, type OutageMode, randomFaults, TestOrigin } from '../helpers/origin.js';
import { prng } from './crash-torture.js';
import { MemorySource } from '../helpers/memory-source.js';

const MiB = 1 << 20;
const REGION = 64 << 10;
/** Settings that make a fault cost milliseconds (the defaults are seconds). */
export const TIMING = { stallTimeoutMs: 250, headersTimeoutMs: 2_000, retryDeadlineMs: 1_500 };
/** Faults per ranged GET in a faults trial. */
const PROBABILITY = 0.4;

export type FaultKind = Fault | 'outage-short' | 'outage-long';

export interface TortureTotals {
  trials: number;
  faults: number;
  byKind: Partial<Record<FaultKind, number>>;
  /** Requests reset or refused during outages, and responses an outage cut. */
  refusedInOutages: number;
  reads: number;
  bytesVerified: number;
  wrongBytes: number;
  expectedIoErrors: number;
  unexpectedIoErrors: number;
  retries: number;
  integrityFailures: number;
  /** Trials whose counters did not account for the faults injected. */
  counterMismatches: number;
  hydrationsCompleted: number;
  problems: string[];
  ms: number;
}

export function emptyTotals(): TortureTotals {
  return { trials: 0, faults: 0, byKind: {}, refusedInOutages: 0, reads: 0, bytesVerified: 0, wrongBytes: 0, expectedIoErrors: 0, unexpectedIoErrors: 0, retries: 0, integrityFailures: 0, counterMismatches: 0, hydrationsCompleted: 0, problems: [], ms: 0 };
}


function makeImage(size: number, seed: number): Buffer {
  const image = Buffer.alloc(size);
  for (let i = 0; i < size; i += 4) image.writeUInt32LE((Math.imul(i + 1, 2654435761) ^ seed) >>> 0, i);
  image.fill(0, 3 * REGION, 5 * REGION); // zero regions, as real images have (skipped with a manifest)
  return image;
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

function countWrong(got: Buffer, want: Buffer): number {
  if (got.equals(want)) return 0;
  let n = 0;
  for (let i = 0; i < got.length; i++) if (got[i] !== want[i]) n++;
  return n;
}

/**
 * One trial: a fresh origin, state directory and target; returns what it saw. Never
 * throws for a finding — findings land in `t.problems` — so a long run reports them all.
 */
export async function trial(seed: number, opts: { imageMiB: number; kind?: 'faults' | 'outages' }, t: TortureTotals): Promise<void> {
  const rnd = prng(seed);
  const int = (n: number): number => Math.floor(rnd() * n);
  const kind = opts.kind ?? (seed % 10 === 0 ? 'outages' : 'faults');
  const withManifest = rnd() < 0.5;
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), `origin-torture-${seed}-`));
  const problem = (what: string): void => {
    t.problems.push(`seed ${seed} (${kind}${withManifest ? ', manifest' : ''}): ${what}`);
  };
  const size = opts.imageMiB * MiB - (rnd() < 0.5 ? 512 * (1 + int(16)) : 0); // a short last region, sometimes
  const image = makeImage(size, seed);
  const imageFile = path.join(dir, 'image.raw');
  fs.writeFileSync(imageFile, image);
  const kinds = FAULT_KINDS.filter((k) => withManifest || k !== 'corrupt');
  const origin = new TestOrigin({
    file: imageFile,
    ...(kind === 'faults' ? { plan: randomFaults({ probability: PROBABILITY, kinds, random: rnd, regionSize: REGION }) } : {}),
  });
  await origin.start();
  const manifest = withManifest ? await Manifest.build(new MemorySource(image), { regionSize: REGION }) : undefined;
  const opened = await openStreamingDisk({
    source: { url: origin.url, ...TIMING, maxConnections: 8, backgroundConnections: 3 },
    targetPath: path.join(dir, 'target.raw'),
    stateDir: path.join(dir, 'state'),
    regionSize: REGION,
    // In an outage trial hydration is slowed (to about six seconds) so that the outages
    // fall while regions are still remote.
    hydrator: { batchBytes: REGION * (1 + int(3)), concurrency: 2 + int(2), ...(kind === 'outages' ? { bandwidth: Math.ceil(size / 6) } : {}) },
    commitIntervalMs: 50,
    ...(manifest ? { manifest } : {}),
  });
  const { disk, hydrator } = opened;
  disk.on('commit-error', (err) => problem(`map commit failed: ${err.message}`));
  const complete = new Promise<void>((resolve) => {
    if (disk.complete) resolve();
    else disk.once('complete', () => resolve());
  });
  let done = false;
  void complete.then(() => {
    done = true;
  });

  // Outage windows (outage trials): the readers classify their errors against these.
  const windows: { start: number; end: number; long: boolean }[] = [];
  let reads = 0;
  const reader = async (): Promise<void> => {
    // Keep reading until hydration is over and a few reads have been done.
    while (!done || reads < 8) {
      const len = rnd() < 0.2 ? 1 + int(512) : 1 + int(kind === 'outages' ? REGION : 4 * REGION);
      const off = int(size - len + 1);
      const buf = Buffer.alloc(len);
      // A read of local regions completes synchronously: yield, or the readers starve the
      // event loop (and the cutover they wait for).
      await new Promise<void>((r) => (kind === 'outages' ? setTimeout(r, 20 + int(60)) : setImmediate(r)));
      const t0 = Date.now();
      reads++;
      t.reads++;
      try {
        await disk.read(off, buf);
      } catch (err) {
        const at = Date.now();
        const code = err instanceof DpuError ? err.code : String(err);
        // Expected only inside a long outage (or just after it ended: the failing attempt
        // may have been in flight), once no byte has arrived for the whole retry deadline
        // (the agent says how long it waited; a read that joined a fetch already under way
        // fails with that fetch, however short its own wait), and the origin has indeed
        // been down about that long.
        const w = windows.find((x) => x.long && at >= x.start && at <= (x.end || at) + 300);
        const waited = Number(/no byte for (\d+) ms/.exec((err as Error).message)?.[1] ?? -1);
        const bound = TIMING.retryDeadlineMs + TIMING.headersTimeoutMs + 500;
        if (w && code === 'DPU_ERR_SOURCE_DEADLINE' && waited >= TIMING.retryDeadlineMs && at - w.start >= TIMING.retryDeadlineMs - 600 && at - t0 <= bound && waited <= bound) {
          t.expectedIoErrors++;
        } else {
          t.unexpectedIoErrors++;
          const where = windows.map((x) => `${x.long ? 'long' : 'short'} ${x.start - t0}..${x.end ? x.end - t0 : 'now'}`).join(', ');
          problem(`read ${off}+${len} failed after ${at - t0} ms with ${code} (outages relative to the read: ${where || 'none'}): ${(err as Error).message}`);
        }
        continue;
      }
      const wrong = countWrong(buf, image.subarray(off, off + len));
      t.bytesVerified += len;
      if (wrong) {
        t.wrongBytes += wrong;
        problem(`read ${off}+${len}: ${wrong} wrong bytes`);
      }
    }
  };

  const t0 = Date.now();
  if (rnd() < 0.8) hydrator.start();
  else setTimeout(() => hydrator.start(), 50 + int(200)); // reads first, hydration joins later
  const readers = Array.from({ length: 3 + int(4) }, () => reader());

  let outageFaults = 0;
  if (kind === 'outages') {
    const n = 2 + int(3);
    for (let i = 0; i < n && !done; i++) {
      // Between outages, time for every read to get through before the next one (its
      // backoff is at most 400 ms after a short outage, 800 ms after a long one), so that
      // outages never add up to the deadline.
      const prev = windows[windows.length - 1];
      await sleep(!prev ? 20 + int(150) : (prev.long ? 1_000 : 500) + int(300));
      if (done) break;
      const long = i === 0 ? false : i === 1 ? true : rnd() < 0.4; // each trial has both
      const mode: OutageMode = rnd() < 0.5 ? 'reset' : 'refuse';
      // Short: over before a read's retries reach the deadline; long: well past it.
      const ms = long ? TIMING.retryDeadlineMs + 500 + int(1_500) : 50 + int(400);
      const w = { start: Date.now(), end: 0, long };
      windows.push(w);
      await origin.setDown(true, mode);
      await sleep(ms);
      w.end = Date.now();
      await origin.setDown(false);
      outageFaults++;
      t.byKind[long ? 'outage-long' : 'outage-short'] = (t.byKind[long ? 'outage-long' : 'outage-short'] ?? 0) + 1;
    }
  }

  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<'timeout'>((r) => (timer = setTimeout(() => r('timeout'), 120_000)));
  const finished = await Promise.race([complete.then(() => 'complete' as const), timeout]);
  clearTimeout(timer);
  if (finished === 'timeout') {
    problem(`hydration did not complete within 120 s (state ${hydrator.state}, last error ${hydrator.lastError})`);
    done = true;
  } else {
    t.hydrationsCompleted++;
  }
  await Promise.all(readers);

  // After everything: the whole disk reads as the image, and the target holds it.
  if (finished === 'complete') {
    const all = Buffer.alloc(size);
    await disk.read(0, all);
    t.reads++;
    t.bytesVerified += size;
    const wrong = countWrong(all, image);
    if (wrong) {
      t.wrongBytes += wrong;
      problem(`final read of the whole disk: ${wrong} wrong bytes`);
    }
  }
  const p = disk.progress();
  await opened.close();
  if (finished === 'complete') {
    const onTarget = fs.readFileSync(path.join(dir, 'target.raw'));
    if (!onTarget.subarray(0, size).equals(image)) problem(`the target differs from the image in ${countWrong(onTarget.subarray(0, size), image)} bytes`);
  }
  const s = origin.stats;
  await origin.stop();

  // The counters account for every fault.
  const needRetry = kinds.filter((k) => k !== 'full200' && k !== 'corrupt').reduce((n, k) => n + (s.byKind[k] ?? 0), 0);
  if (kind === 'faults') {
    if (p.fetchRetries !== needRetry || p.fetchFailures !== 0 || p.integrityFailures !== (s.byKind.corrupt ?? 0)) {
      t.counterMismatches++;
      problem(`counters: ${p.fetchRetries} retries for ${needRetry} faults that need one, ${p.fetchFailures} failures, ${p.integrityFailures} integrity failures for ${s.byKind.corrupt ?? 0} corruptions`);
    }
  } else if (p.fetchRetries + p.fetchFailures < s.refused + s.cutByOutage || p.integrityFailures !== 0) {
    // An outage's failed attempts are retries, or failures once the deadline is reached;
    // a pooled connection the outage killed may cost one more that the origin never saw.
    t.counterMismatches++;
    problem(`counters: ${p.fetchRetries} retries + ${p.fetchFailures} failures for ${s.refused} refused requests and ${s.cutByOutage} cut responses; ${p.integrityFailures} integrity failures`);
  }
  for (const [k, v] of Object.entries(s.byKind)) t.byKind[k as Fault] = (t.byKind[k as Fault] ?? 0) + v;
  t.faults += s.faultsInjected + outageFaults;
  t.refusedInOutages += s.refused + s.cutByOutage;
  t.retries += p.fetchRetries;
  t.integrityFailures += p.integrityFailures;
  t.trials++;
  t.ms += Date.now() - t0;
  fs.rmSync(dir, { recursive: true, force: true });
}

/** Runs trials (`parallel` at a time, seeds from `seed` on) until `faults` faults were injected. */
export async function torture(o: { faults: number; seed?: number; imageMiB?: number; parallel?: number; onTrial?: (t: TortureTotals) => void }): Promise<TortureTotals> {
  const t = emptyTotals();
  const t0 = Date.now();
  let next = o.seed ?? 1;
  const worker = async (): Promise<void> => {
    while (t.faults < o.faults) {
      const seed = next++;
      try {
        await trial(seed, { imageMiB: o.imageMiB ?? 4 }, t);
      } catch (err) {
        t.problems.push(`seed ${seed}: trial threw ${(err as Error).stack ?? String(err)}`);
        t.trials++;
      }
      o.onTrial?.(t);
    }
  };
  await Promise.all(Array.from({ length: o.parallel ?? 4 }, () => worker()));
  t.ms = Date.now() - t0;
  return t;
}

export function summary(t: TortureTotals, o: { seed: number; imageMiB: number }): string {
  const kinds = Object.entries(t.byKind)
    .sort(([a], [b]) => a.localeCompare(b))
    .map(([k, v]) => `${k} ${v}`)
    .join(', ');
  return [
    `origin torture: ${t.trials} trials (seeds ${o.seed}..${o.seed + t.trials - 1}, ${o.imageMiB} MiB images, ${REGION >> 10} KiB regions), ${(t.ms / 1000).toFixed(1)} s`,
    `faults injected: ${t.faults} (${kinds}); ${t.refusedInOutages} requests refused or cut during outages`,
    `reads: ${t.reads}, bytes verified: ${t.bytesVerified}, wrong bytes: ${t.wrongBytes}`,
    `I/O errors: ${t.expectedIoErrors} expected (outage longer than the ${TIMING.retryDeadlineMs} ms deadline), ${t.unexpectedIoErrors} unexpected`,
    `agent counters: ${t.retries} retries, ${t.integrityFailures} integrity failures; ${t.counterMismatches} trials where they disagree with the faults`,
    `hydration completed, target = image: ${t.hydrationsCompleted} of ${t.trials}`,
    ...(t.problems.length ? [`PROBLEMS (${t.problems.length}):`, ...t.problems.slice(0, 40).map((p) => `  ${p}`)] : ['no problems']),
  ].join('\n');
}

async function main(): Promise<void> {
  const { values } = parseArgs({ options: { faults: { type: 'string', default: '1000' }, seed: { type: 'string', default: '1' }, 'image-mib': { type: 'string', default: '4' }, parallel: { type: 'string', default: '4' } } });
  const seed = Number(values.seed);
  const imageMiB = Number(values['image-mib']);
  let last = Date.now();
  const t = await torture({
    faults: Number(values.faults),
    seed,
    imageMiB,
    parallel: Number(values.parallel),
    onTrial: (x) => {
      if (Date.now() - last > 30_000) {
        last = Date.now();
        process.stderr.write(`… ${x.trials} trials, ${x.faults} faults, ${x.problems.length} problems\n`);
      }
    },
  });
  process.stdout.write(`${summary(t, { seed, imageMiB })}\n`);
  if (t.problems.length) process.exit(1);
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  main().catch((err: Error) => {
    process.stderr.write(`${err.stack ?? err.message}\n`);
    process.exit(1);
  });
}

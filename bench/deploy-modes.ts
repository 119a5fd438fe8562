/**
 * Deploy modes: how long a bare-metal host takes from "deploy" to a booted OS, and how fast
 * its disk is while and after the image arrives, for the ways of giving it a disk — on the
 * same emulated link, from the same origin, with the same boot path.
 *
 *   streaming          `dpu-agent stream` from the origin URL; QEMU boots from its export at
 *                      once while the rest of the image is copied in the background.
 *   streaming-profile  streaming with a learned boot profile (issue #14 part 3): the agent
 *                      replays (`--boot-profile`) what one streaming boot of the image
 *                      recorded (`--record-profile`) at the same rate before the rounds.
 *   copy-first         what Ironic's `direct` deploy does: the whole image is downloaded to
 *                      the local disk (curl, then fsync), then QEMU boots from the copy.
 *   network-only       the host reads the origin for ever: `nbdkit curl` (with the cow
 *                      filter when the guest writes, so its writes stay on the host).
 *   local              the baseline: the image already on the local disk (page cache dropped).
 *
 * Two images (`--image`):
 *   debian   (default) the real Debian 12 cloud image of tests/fixtures/make-debian-image.sh
 *            (GPT, GRUB on an ESP, the cloud kernel, systemd, cloud-init), booted under OVMF
 *            with a NIC on QEMU's user network; the clock stops at the serial login prompt
 *            (LOGIN_PROMPT). Rounds at each `--rates` rate (1 Gbit/s, and 100 Mbit/s: TCG
 *            boots ~10× slower than hardware, so a 10× slower link keeps the ratio of boot
 *            time to wire time of a real host on 1 Gbit/s), plus per rate one streaming boot
 *            with no background copy, which measures the boot's read working set.
 *   busybox  the boot fixture (SYSLINUX, a Debian kernel, a busybox initramfs printing
 *            SMARTNIC-BOOT-OK) padded to each `--sizes` size: seconds per boot, so it covers
 *            8 GiB images and the fio part; the goals of issue #7 come from it.
 *
 * Why it is shaped this way:
 * - One boot path for all: every mode ends in an NBD export on a unix socket (the agent's,
 *   or `nbdkit file` / `nbdkit curl`) that QEMU (TCG, q35, NVMe disk) boots from, so the
 *   differences are where the bytes come from and when, never the emulated hardware.
 * - The modes are one table (MODE_SPECS): an untimed `prepare` (the local copy, page cache
 *   dropped) and a timed `start` that ends when an export answers. A new mode is an entry.
 * - The origin is nginx-light inside the link's network namespace, so every byte the host
 *   side gets crosses the veth pair shaped by `tc tbf`; nginx sends with sendfile and does
 *   not itself cap the link (a Node origin does near 1 Gbit/s). The veth's rx_bytes is what
 *   crossed the wire, headers included.
 * - The clock starts when the mode starts (agent spawned / curl spawned / nbdkit spawned),
 *   and stops when the marker appears on QEMU's serial console. Readiness of an export
 *   is polled every 10 ms by reading its NBD greeting, without spawning a client, so the
 *   poll adds the same few ms to every mode.
 * - Every run boots a pristine image: the agent's target, curl's download, a fresh local
 *   copy (when the guest writes) or a cow overlay are the run's own, so every Debian boot is
 *   a first boot (machine-id, SSH host keys, cloud-init), the same work in every mode.
 * - At the marker QEMU's own counters of the disk (QMP query-blockstats) say what the guest
 *   read and wrote, in how many requests: the same for every mode, or a mode changed the boot.
 * - Mode order is rotated every round so slow drifts of the shared machine fall on all modes.
 *   QEMU is stopped by PID at the marker in timing runs; files written by a run are deleted
 *   right after it (their dirty pages die with them instead of being written back during
 *   the next run).
 * - I/O runs (busybox only) are separate from timing runs (fio would otherwise slow the boot
 *   it measures) and use the smallest size only: each boots the host, then at the marker
 *   runs fio's nbd engine against the same export. "During" hydration needs a streaming
 *   deploy per workload, because at 1 Gbit/s a 1 GiB image has only a few seconds of
 *   hydration left at the marker; the sequential read starts at the hydration front (what
 *   the host has not got yet). "After" runs drop the page cache of the export's local file
 *   first, so they read the disk like a host whose RAM does not hold its image.
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
import { BOOT_MARKER, buildDebianImage, LOGIN_PROMPT } from '../tests/helpers/boot-image.js';
import { run } from '../tests/helpers/run.js';
import { startNginxOrigin } from './lib/nginx-origin.js';
import { buildPaddedBootImage } from './lib/boot-image-padded.js';
import { MarkerTimeout, startQemuHost, type BlockStats, type QemuHostOptions } from './lib/boot-qemu.js';
import { BootHung, bootAgainIfHung, defaultModes, hungName, MODES, rateLabel, realOsGoals, roundOrder, type HungBoot, type Mode, type RealOsGoals } from './lib/deploy-plan.js';
import { parseDuration } from '../dpu-agent/src/cli/units.js';
import { RECORDING_DEFAULTS } from '../dpu-agent/src/streaming/boot-profile.js';
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
const SECTION_REAL_OS = '## Deploy modes on a real OS: Debian 12 (UEFI) to the login prompt';

// ---------------------------------------------------------------- options

const USAGE = `Usage: node dist/bench/deploy-modes.js [options]   (run it under: flock /tmp/heavy.lock …)

Boots a QEMU host from an NBD disk deployed several ways over one emulated link (streaming,
streaming with a boot profile, copy-first, network-only, local disk) and times deploy → the
OS is up. With the Debian image: to the serial login prompt, at each link rate, and the
boot's read working set.
With the busybox fixture: to its boot marker, per image size, then the booted host's disk
with fio during and after hydration (smallest size only).

  --image NAME      debian (default: the Debian 12 cloud image, UEFI, to the login prompt)
                    or busybox (the padded boot fixture, to SMARTNIC-BOOT-OK)
  --rates LIST      link rates, e.g. 1gbit,100mbit (default: debian 1gbit,100mbit;
                    busybox 1gbit; --quick: the first of the default)
  --link RATE       one link rate (the same as --rates RATE)
  --modes LIST      modes in each round, of streaming, streaming-profile, copy-first,
                    network-only, local (default: debian all five; busybox all but
                    streaming-profile). streaming-profile replays a boot profile recorded
                    by one streaming boot per image and rate before the rounds
  --profile-window TIME
                    the recording's window (\`stream --profile-window\`): it ends this long
                    after the boot's first read, and the recording boot waits for it;
                    raise it on a busy machine where the boot takes longer (default ${RECORDING_DEFAULTS.windowMs / 1000}s)
  --reps N          rounds per rate (and size); tables show medians (default: debian 5,
                    busybox 3; --quick 1)
  --working-set N   debian: streaming boots with no background copy per rate, to measure
                    the boot's read working set (default 1; 0 skips them)
  --sizes LIST      busybox: image sizes, e.g. 1G,8G (default 1G,8G; each ≥ 64M, whole MiB)
  --io-runtime S    busybox: seconds per fio job (default 3)
  --no-io           busybox: skip the fio part
  --link-index N    emulated link index, 50–57 (default 50)
  --agent-args STR  extra \`dpu-agent stream\` flags for the streaming modes (and the boot
                    that records the profile), space-separated
                    (e.g. "--hydrate-connections 1"); shown in the report
  --quick           smoke run: 1 round at one rate (busybox: 256M, 2 s fio jobs);
                    docs/ untouched unless --docs
  --workdir DIR     where images, copies and sockets go (default: a fresh dir in the OS temp dir)
  --keep            keep the work directory
  --docs            update docs/benchmarks.md and the plots even with --quick
  --no-docs         do not touch docs/
  --help`;

type ImageKind = 'busybox' | 'debian';

interface RateSpec {
  /** As given: 1gbit, 100mbit. */
  label: string;
  /** Bytes per second. */
  rate: number;
}

interface Options {
  image: ImageKind;
  /** busybox: the padded sizes; debian: empty (the image's own size). */
  sizes: number[];
  rates: RateSpec[];
  modes: Mode[];
  reps: number;
  workingSet: number;
  /** streaming-profile: the recording's window, as `stream --profile-window` takes it, and in ms. */
  profileWindow: { arg: string; ms: number };
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
      image: { type: 'string' },
      sizes: { type: 'string' },
      rates: { type: 'string' },
      link: { type: 'string' },
      modes: { type: 'string' },
      reps: { type: 'string' },
      'working-set': { type: 'string' },
      'profile-window': { type: 'string' },
      'io-runtime': { type: 'string' },
      'link-index': { type: 'string' },
      'agent-args': { type: 'string' },
      'no-io': { type: 'boolean' },
    },
  });
  const common = benchFlags(v, USAGE);
  const quick = common.quick;
  const num = (name: string, s: string | undefined, dflt: number): number => positive(name, s, dflt);
  const image = (v.image ?? 'debian') as ImageKind;
  if (image !== 'debian' && image !== 'busybox') throw new Error(`--image "${v.image}" is not debian or busybox`);
  const debian = image === 'debian';
  if (debian && (v.sizes !== undefined || v['io-runtime'] !== undefined || v['no-io'] !== undefined)) {
    throw new Error('--sizes, --io-runtime and --no-io are for --image busybox: the Debian image has its own size and no fio part');
  }
  if (v.rates !== undefined && v.link !== undefined) throw new Error('give --rates or --link, not both');
  const defaultRates = debian ? ['1gbit', '100mbit'] : ['1gbit'];
  const rateList = (v.rates ?? v.link)?.split(',') ?? (quick ? defaultRates.slice(0, 1) : defaultRates);
  const rates = [...new Map(rateList.map((s) => s.trim()).map((s) => [s, { label: s, rate: parseRateArg(s, '--rates') }])).values()];
  const linkIndex = Math.round(num('link-index', v['link-index'], 50));
  if (linkIndex < 50 || linkIndex > 57) throw new Error('--link-index must be 50–57 (other indexes belong to other users of lab/netns.ts)');
  const sizes = debian ? [] : (v.sizes ?? (quick ? '256M' : '1G,8G')).split(',').map((s) => parseSize(s));
  const modes = (v.modes?.split(',').map((s) => s.trim()) ?? defaultModes(image)) as Mode[];
  for (const m of modes) {
    if (!(MODES as readonly string[]).includes(m)) throw new Error(`--modes: "${m}" is not one of ${MODES.join(', ')}`);
  }
  if (!modes.length) throw new Error('--modes: no mode');
  const workingSet = v['working-set'] === undefined ? 1 : Number(v['working-set']);
  if (!Number.isInteger(workingSet) || workingSet < 0) throw new Error(`--working-set "${v['working-set']}" is not a whole number ≥ 0`);
  const windowArg = v['profile-window'] ?? `${RECORDING_DEFAULTS.windowMs / 1000}s`;
  const windowMs = parseDuration(windowArg, '--profile-window');
  if (windowMs < 100) throw new Error(`--profile-window ${windowArg} is below the agent's minimum of 100 ms`);
  return {
    image,
    sizes: [...new Set(sizes)].sort((a, b) => a - b),
    rates,
    modes: [...new Set(modes)],
    reps: Math.round(num('reps', v.reps, quick ? 1 : debian ? 5 : 3)),
    workingSet: debian ? workingSet : 0,
    profileWindow: { arg: windowArg, ms: windowMs },
    ioRuntime: num('io-runtime', v['io-runtime'], quick ? 2 : 3),
    linkIndex,
    agentArgs: (v['agent-args'] ?? '').split(/\s+/).filter(Boolean),
    io: !debian && v['no-io'] !== true,
    ...common,
  };
}

function parseSize(s: string): number {
  const n = parseSizeArg(s, '--sizes');
  if (n < 64 * MiB || n % MiB !== 0) throw new Error(`--sizes "${s}": a whole number of MiB, at least 64M (the boot fixture itself)`);
  return n;
}

function sizeLabel(n: number): string {
  return n % GiB === 0 ? `${n / GiB} GiB` : n % MiB === 0 ? `${n / MiB} MiB` : fmtBytes(n);
}

// ---------------------------------------------------------------- images

/** A disk image at the origin, and how a host boots it. */
interface BenchImage {
  kind: ImageKind;
  /** The file nginx serves (never written by a run). */
  file: string;
  url: string;
  size: number;
  /** Bytes of `file` allocated on disk (the Debian image is sparse; every mode moves `size` bytes). */
  allocated: number;
  /** "1 GiB", "Debian 12 cloud (770 MiB)". */
  label: string;
  /** What stops the clock, in words. */
  markerName: string;
  boot: Omit<QemuHostOptions, 'dir'>;
  /**
   * The guest writes to its disk (a real OS: journal, machine-id, SSH host keys, cloud-init's
   * state). Then network-only gets the cow filter (nbdkit curl alone is read-only) and local
   * boots a fresh copy, so no run writes the origin's file or sees an earlier run's writes.
   */
  guestWrites: boolean;
}

function busyboxImage(dir: string, base: string, size: number): BenchImage {
  const name = `boot-${size / MiB}M.raw`;
  return {
    kind: 'busybox', file: path.join(dir, name), url: `${base}/${name}`, size, allocated: size, label: sizeLabel(size),
    markerName: 'boot marker',
    boot: { marker: BOOT_MARKER, firmware: 'seabios', memoryMiB: 512, timeoutMs: 300_000 },
    guestWrites: false,
  };
}

function debianImage(dir: string, base: string): BenchImage {
  const name = 'debian12-uefi.raw';
  return {
    kind: 'debian', file: path.join(dir, name), url: `${base}/${name}`, size: 0, allocated: 0, label: 'Debian 12 cloud image',
    markerName: 'login prompt',
    // Like tests/integration/real-os-boot.test.ts: 1 GiB of RAM, UEFI, a NIC for cloud-init's
    // DHCP. Under TCG a boot takes 60–100 s, several times that on a busy machine.
    boot: { marker: LOGIN_PROMPT, firmware: 'ovmf', memoryMiB: 1024, network: true, timeoutMs: 900_000 },
    guestWrites: true,
  };
}

/** Writes the image's file (the Debian one is copied from make-debian-image.sh's cache) and fills in its size. */
async function buildImage(img: BenchImage, log: (s: string) => void): Promise<void> {
  const t = performance.now();
  if (img.kind === 'busybox') {
    await buildPaddedBootImage(img.file, img.size, { onProgress: (w, n) => w % GiB === 0 && log(`  image ${sizeLabel(img.size)}: ${fmtBytes(w)} / ${fmtBytes(n)}`) });
  } else {
    await buildDebianImage(img.file, { boot: 'uefi', log: (l) => log(`  ${l}`) });
    img.size = fs.statSync(img.file).size;
    img.label = `Debian 12 cloud image (${sizeLabel(img.size)})`;
  }
  img.allocated = fs.statSync(img.file).blocks * 512;
  log(`  image ${img.label} ready in ${((performance.now() - t) / 1000).toFixed(1)} s (${fmtBytes(img.allocated)} allocated)`);
}

// ---------------------------------------------------------------- records

interface BootRun {
  image: ImageKind;
  /** The link rate's label (1gbit, 100mbit). */
  link: string;
  size: number;
  rep: number;
  mode: Mode;
  /** Deploy start → marker (boot marker or login prompt), seconds. */
  toMarkerS: number;
  /** Deploy start → QEMU spawned (export answering), seconds. */
  toQemuS: number;
  /** QEMU spawned → marker, seconds. */
  qemuToMarkerS: number;
  /** Bytes received on the host side of the link from deploy start to the marker. */
  wireAtMarker: number;
  /** … to the end of the run (streaming: hydration complete). */
  wireTotal: number;
  /** Deploy start → the whole image local (streaming: `complete`; copy-first: download fsynced). */
  imageLocalS: number | null;
  /** Streaming: fraction of regions local when the marker appeared. */
  hydratedAtMarker: number | null;
  /** Streaming: the agent's bytes fetched in its last progress line before the marker (lines come every second). */
  agentFetchedAtMarker: number | null;
  /** CPU seconds (utime+stime) QEMU used from spawn to the marker: the boot's work, whatever the contention. */
  qemuCpuS: number;
  /** Streaming: CPU seconds the agent used from spawn to the marker (it shares the 2 cores with QEMU here). */
  agentCpuS: number | null;
  /** QEMU's counters of the boot disk at the marker: what the guest read and wrote, in how many requests. */
  guest: BlockStats | null;
  /** 1-minute load average when the run started (the machine is shared). */
  load1: number;
}

/**
 * A streaming boot with no background copy (`--no-hydrate`): every byte the agent fetched
 * by the login prompt was asked for by the boot, so the fetched bytes are the boot's read
 * working set in regions, and QEMU's counters the same working set as the guest asked.
 */
interface WorkingSetRun {
  link: string;
  rep: number;
  toMarkerS: number;
  qemuToMarkerS: number;
  /** The agent's bytes fetched once QEMU stopped at the marker (its next progress line). */
  fetched: number;
  regionsLocal: number;
  regionsTotal: number;
  regionSize: number;
  wireAtMarker: number;
  guest: BlockStats | null;
  qemuCpuS: number;
  agentCpuS: number;
  load1: number;
}

/** The boot profile the streaming-profile rounds of one image and rate replay (recordProfile). */
interface ProfileRecording {
  link: string;
  size: number;
  /** The profile (the agent's --record-profile file, in the work dir). */
  file: string;
  /** Deploy → marker of the recording boot, seconds. */
  toMarkerS: number;
  /** Regions recorded, their size, and the image's regions. */
  regions: number;
  regionSize: number;
  imageRegions: number;
  stopReason: string | null;
  /** The recording began at the boot's first read and ended this long after the marker (QEMU stopped there), s; negative: before it. */
  endedAfterMarkerS: number;
  /** The profile's regions in order, for the raw results. */
  order: number[];
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
  /** The rate the link is shaped to now. */
  rate: RateSpec;
  seq: number;
  /** The boot profile recorded for the image and rate of the rounds under way (streaming-profile), or null. */
  profile: ProfileRecording | null;
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

/** Copies `src` to `dst` with every byte written (holes too), fsynced: a disk the image was written to. */
function denseCopy(src: string, dst: string): void {
  const buf = Buffer.allocUnsafe(8 * MiB);
  const i = fs.openSync(src, 'r');
  const o = fs.openSync(dst, 'w');
  try {
    let off = 0;
    let n: number;
    while ((n = fs.readSync(i, buf, 0, buf.length, off)) > 0) {
      fs.writeSync(o, buf, 0, n, off);
      off += n;
    }
    fs.fsyncSync(o);
  } finally {
    fs.closeSync(i);
    fs.closeSync(o);
  }
}

// ---------------------------------------------------------------- the modes

/** One run's deployment as a mode sees it. */
interface ModeRun {
  lab: Lab;
  img: BenchImage;
  /** Unique per run: names its files. */
  id: string;
  socket: string;
  /** Extra `dpu-agent stream` flags of this run (after --agent-args). */
  agentExtra: string[];
  /** Files and directories of the run, deleted when it ends. */
  files: string[];
}

/** What a mode's `start` leaves running: the export's process and where its bytes are. */
interface Started {
  child: ChildProcess;
  agent: AgentProcess | null;
  /** The local file the export reads (null for network-only; the agent's target for streaming). */
  localFile: string | null;
  /** copy-first: performance.now() when the download was durable. */
  downloadedAt: number | null;
}

interface ModeSpec {
  /** How the disk is given, for the report. */
  how(img: BenchImage): string;
  /** Untimed, before the clock starts: what the mode has in place before a deploy begins. */
  prepare?(r: ModeRun): void;
  /** Timed from its first line: returns once the export answers its NBD greeting. */
  start(r: ModeRun): Promise<Started>;
}

async function startStreaming(r: ModeRun, flags: string[]): Promise<Started> {
  const target = path.join(r.lab.dir, `${r.id}.target`);
  const state = path.join(r.lab.dir, `${r.id}.state`);
  r.files.push(target, state);
  const agent = new AgentProcess({ source: r.img.url, target, state, socket: r.socket, extra: [...r.lab.opts.agentArgs, ...flags, ...r.agentExtra], poison: false });
  track(agent.child);
  await waitGreeting(r.socket, agent.child, 'dpu-agent');
  return { child: agent.child, agent, localFile: target, downloadedAt: null };
}

async function startNbdkit(r: ModeRun, args: string[], name: string, localFile: string | null, downloadedAt: number | null = null): Promise<Started> {
  const nbd = spawnTracked('nbdkit', ['-f', '-U', r.socket, ...args]);
  await waitGreeting(r.socket, nbd.child, name);
  return { child: nbd.child, agent: null, localFile, downloadedAt };
}

/** The local disk of the local mode: the origin's file (a guest that never writes), or a fresh copy of it. */
const localCopy = (r: ModeRun): string => (r.img.guestWrites ? path.join(r.lab.dir, `${r.id}.local.raw`) : r.img.file);

const MODE_SPECS: Record<Mode, ModeSpec> = {
  streaming: {
    how: () => '`dpu-agent stream --source URL --target FILE --state DIR --listen unix:SOCK` (defaults otherwise)',
    start: (r) => startStreaming(r, []),
  },
  // The profile is recorded once per image and rate before the rounds (recordProfile):
  // every round replays the same one, as a deployment replays the image's stored profile.
  'streaming-profile': {
    how: () => '`dpu-agent stream … --boot-profile FILE` (defaults otherwise), FILE recorded with `--record-profile` by one streaming boot of the image at the same rate before the rounds',
    start: (r) => {
      if (!r.lab.profile) throw new Error('streaming-profile: no boot profile was recorded for this image and rate');
      return startStreaming(r, ['--boot-profile', r.lab.profile.file]);
    },
  },
  'copy-first': {
    how: () => '`curl -sS --fail -o FILE URL`, fsync, then `nbdkit -f -U SOCK file FILE`',
    start: async (r) => {
      const copy = path.join(r.lab.dir, `${r.id}.raw`);
      r.files.push(copy);
      const curl = spawnTracked('curl', ['-sS', '--fail', '-o', copy, r.img.url]);
      const code = await new Promise<number | null>((resolve) => curl.child.once('exit', (c) => resolve(c)));
      if (code !== 0) throw new Error(`curl ${r.img.url} failed (${code}): ${curl.stderr()}`);
      flushFile(copy);
      const downloadedAt = performance.now();
      if (fs.statSync(copy).size !== r.img.size) throw new Error(`curl wrote ${fs.statSync(copy).size} bytes, expected ${r.img.size}`);
      return startNbdkit(r, ['file', copy], 'nbdkit file', copy, downloadedAt);
    },
  },
  'network-only': {
    how: (img) =>
      img.guestWrites
        ? '`nbdkit -f -U SOCK --filter=cow curl url=URL` (reads go to the origin every time; the guest\'s writes stay in the cow overlay)'
        : '`nbdkit -f -U SOCK curl url=URL` (no cache filter)',
    // nbdkit curl alone is read-only, and a real OS that cannot write its root file system
    // does not reach multi-user; the cow filter keeps the writes without caching reads.
    start: (r) => startNbdkit(r, [...(r.img.guestWrites ? ['--filter=cow'] : []), 'curl', `url=${r.img.url}`, 'timeout=60'], 'nbdkit curl', null),
  },
  local: {
    how: (img) =>
      img.guestWrites
        ? '`nbdkit -f -U SOCK file COPY` on a fresh copy of the image on the local disk (every byte written, fsynced, page cache dropped; made before the clock starts)'
        : '`nbdkit -f -U SOCK file IMAGE` on the image already on the local disk, page cache dropped first',
    prepare: (r) => {
      const file = localCopy(r);
      if (file !== r.img.file) {
        r.files.push(file);
        denseCopy(r.img.file, file);
      }
      // The baseline boots from a disk, not from RAM: the image's cached pages go first.
      flushFile(file);
      dropFileCache(file);
    },
    start: (r) => startNbdkit(r, ['file', localCopy(r)], 'nbdkit file', localCopy(r)),
  },
};

// ---------------------------------------------------------------- one deployment

interface Deployment extends Started {
  mode: Mode;
  socket: string;
  /** Per-boot files of the host (QMP socket, OVMF's variable store). */
  hostDir: string;
  /** performance.now() at deploy start. */
  t0: number;
  /** Date.now() at deploy start, to place the agent's timestamped events on the run's clock. */
  t0Wall: number;
  stop(): Promise<void>;
}

function nbdUri(socket: string): string {
  return `nbd+unix:///?socket=${socket}`;
}

async function deploy(lab: Lab, mode: Mode, img: BenchImage, agentExtra: string[] = []): Promise<Deployment> {
  const id = `${mode}-${++lab.seq}`;
  const socket = path.join(lab.dir, `${id}.sock`);
  const hostDir = path.join(lab.dir, `${id}.host`);
  fs.mkdirSync(hostDir);
  const r: ModeRun = { lab, img, id, socket, agentExtra, files: [socket, hostDir] };
  const remove = (): void => {
    for (const f of r.files) fs.rmSync(f, { recursive: true, force: true });
  };
  const spec = MODE_SPECS[mode];
  try {
    spec.prepare?.(r);
    const t0 = performance.now();
    const t0Wall = Date.now();
    const s = await spec.start(r);
    return {
      ...s, mode, socket, hostDir, t0, t0Wall,
      stop: async () => {
        await stopChild(s.child, 10_000);
        remove();
      },
    };
  } catch (err) {
    remove();
    throw err;
  }
}

type Host = ReturnType<typeof startQemuHost>;
/** Which boot this is, for its record if it hangs. */
type BootId = Omit<HungBoot, 'timeoutS' | 'guest' | 'serialTail'>;

function startHost(d: Deployment, img: BenchImage, timeoutMs?: number): Host {
  return startQemuHost(d.socket, { dir: d.hostDir, ...img.boot, ...(timeoutMs !== undefined ? { timeoutMs } : {}) });
}

/** The rate, and the image's size where the image has several (the busybox fixture). */
function hungWhere(lab: Lab, img: BenchImage): Pick<HungBoot, 'link' | 'size'> {
  return { link: lab.rate.label, ...(img.kind === 'debian' ? {} : { size: sizeLabel(img.size) }) };
}

/** The host's marker time; a boot that does not reach it in time is a BootHung, with QEMU's disk counters and serial tail. */
async function markerOrHung(host: Host, hung: BootId): Promise<number> {
  try {
    return await host.marker;
  } catch (err) {
    if (!(err instanceof MarkerTimeout)) throw err;
    const guest = await guestStats(host);
    throw new BootHung({ ...hung, timeoutS: err.timeoutMs / 1000, guest, serialTail: err.serialTail });
  }
}

/**
 * One boot: deploys `mode` (with `agentExtra` for the agent), starts the host, waits for
 * its marker (a BootHung if it does not come in time) and hands both to `measure`. QEMU is
 * stopped before the export on every path (stopping it twice is harmless, so `measure`
 * may stop it early).
 */
async function boot<T>(lab: Lab, mode: Mode, img: BenchImage, agentExtra: string[], timeoutMs: number | undefined, hung: BootId, measure: (d: Deployment, host: Host, markerAt: number) => Promise<T>): Promise<T> {
  const d = await deploy(lab, mode, img, agentExtra);
  let host: Host | null = null;
  try {
    host = startHost(d, img, timeoutMs);
    return await measure(d, host, await markerOrHung(host, hung));
  } finally {
    await host?.stop();
    await d.stop();
  }
}

/**
 * How long a boot may take before it counts as hung: the image's own deadline until a boot
 * of this image and size at this rate has finished, then 4× the slowest finished one (at
 * least 4 minutes), so a hung guest costs minutes, not the 15 a first Debian boot is
 * allowed. The boot that records a profile runs before the rounds at its rate, so it gets
 * the image's deadline.
 */
function hangTimeoutMs(img: BenchImage, done: readonly BootRun[], link: string): number | undefined {
  const same = done.filter((r) => r.link === link && r.image === img.kind && r.size === img.size);
  if (!same.length) return undefined;
  return Math.min(img.boot.timeoutMs ?? 900_000, Math.max(240_000, 4_000 * Math.max(...same.map((r) => r.qemuToMarkerS))));
}

function hydrated(agent: AgentProcess | null): number | null {
  if (!agent) return null;
  if (agent.events.some((e) => e.event === 'complete')) return 1;
  const p = agent.latestProgress();
  const local = p?.['regionsLocal'];
  const total = p?.['regionsTotal'];
  return typeof local === 'number' && typeof total === 'number' && total > 0 ? local / total : null;
}

function fetchedSoFar(agent: AgentProcess | null): number | null {
  const b = agent?.latestProgress()?.['bytesFetched'];
  return typeof b === 'number' ? b : null;
}

/** Generous: the image at a quarter of the link rate, plus two minutes. */
function hydrationTimeoutMs(lab: Lab, size: number): number {
  return (size / lab.rate.rate) * 4000 + 120_000;
}

/** QEMU's disk counters, or null (and a warning) when QMP does not answer: a missing figure must not lose the run. */
async function guestStats(host: Host): Promise<BlockStats | null> {
  try {
    return await host.blockStats();
  } catch (err) {
    console.error(`    (QMP query-blockstats failed: ${(err as Error).message})`);
    return null;
  }
}

// ---------------------------------------------------------------- timing run

function load1(): number {
  return Number(fs.readFileSync('/proc/loadavg', 'utf8').split(' ')[0]);
}

async function bootRun(lab: Lab, mode: Mode, img: BenchImage, rep: number, timeoutMs?: number, attempt = 1): Promise<BootRun> {
  const load = load1();
  const rx0 = lab.link.rxBytes();
  return boot(lab, mode, img, [], timeoutMs, { run: 'round', ...hungWhere(lab, img), mode, rep, attempt }, async (d, host, markerAt) => {
    const wireAtMarker = lab.link.rxBytes() - rx0;
    const hydratedAtMarker = hydrated(d.agent);
    const agentFetchedAtMarker = fetchedSoFar(d.agent);
    const qemuCpuS = cpuSeconds(host.child.pid!, 'qemu');
    const agentCpuS = d.agent ? cpuSeconds(d.agent.child.pid!, 'dpu-agent') : null;
    const guest = await guestStats(host);
    await host.stop();
    let imageLocalS: number | null = d.downloadedAt !== null ? (d.downloadedAt - d.t0) / 1000 : null;
    if (d.agent) {
      // When the event was sent, not when it is awaited: over a long boot (the real OS) the
      // copy ends long before the prompt.
      const done = await d.agent.complete(hydrationTimeoutMs(lab, img.size));
      imageLocalS = (Date.parse(String(done['ts'])) - d.t0Wall) / 1000;
    }
    return {
      image: img.kind, link: lab.rate.label, size: img.size, rep, mode,
      toMarkerS: (markerAt - d.t0) / 1000,
      toQemuS: (host.startedAt - d.t0) / 1000,
      qemuToMarkerS: (markerAt - host.startedAt) / 1000,
      wireAtMarker,
      wireTotal: lab.link.rxBytes() - rx0,
      imageLocalS,
      hydratedAtMarker,
      agentFetchedAtMarker,
      qemuCpuS,
      agentCpuS,
      guest,
      load1: load,
    };
  });
}

async function workingSetRun(lab: Lab, img: BenchImage, rep: number, timeoutMs?: number, attempt = 1): Promise<WorkingSetRun> {
  const load = load1();
  const rx0 = lab.link.rxBytes();
  return boot(lab, 'streaming', img, ['--no-hydrate'], timeoutMs, { run: 'working set', ...hungWhere(lab, img), mode: 'streaming', rep, attempt }, async (d, host, markerAt) => {
    const wireAtMarker = lab.link.rxBytes() - rx0;
    const qemuCpuS = cpuSeconds(host.child.pid!, 'qemu');
    const agentCpuS = cpuSeconds(d.agent!.child.pid!, 'dpu-agent');
    const guest = await guestStats(host);
    await host.stop();
    // With no background copy and no host, nothing more is fetched: the agent's next
    // progress line (one a second) holds the boot's total.
    const stoppedAt = Date.now();
    const p = await d.agent!.waitFor((e) => e.event === 'progress' && Date.parse(String(e['ts'])) > stoppedAt, 5000);
    return {
      link: lab.rate.label, rep,
      toMarkerS: (markerAt - d.t0) / 1000,
      qemuToMarkerS: (markerAt - host.startedAt) / 1000,
      fetched: p['bytesFetched'] as number,
      regionsLocal: p['regionsLocal'] as number,
      regionsTotal: p['regionsTotal'] as number,
      regionSize: p['regionSize'] as number,
      wireAtMarker,
      guest,
      qemuCpuS,
      agentCpuS,
      load1: load,
    };
  });
}

/**
 * The boot profile for the streaming-profile rounds at the link's rate: one streaming boot
 * with `--record-profile`, QEMU stopped at the marker as in every timing run, so the profile
 * holds the boot's reads up to the marker and nothing after; the recording then ends when
 * its window (from the boot's first read) runs out, and the agent writes the file. A boot
 * slower than the window leaves the end of the boot out of the profile: the log says so.
 */
async function recordProfile(lab: Lab, img: BenchImage, timeoutMs?: number, attempt = 1): Promise<ProfileRecording> {
  const load = load1();
  const file = path.join(lab.dir, `profile-${img.kind}-${img.size}-${lab.rate.label}.json`);
  fs.rmSync(file, { force: true }); // a hung attempt's
  const agentExtra = ['--record-profile', file, '--profile-window', lab.opts.profileWindow.arg];
  return boot(lab, 'streaming', img, agentExtra, timeoutMs, { run: 'profile recording', ...hungWhere(lab, img), mode: 'streaming-profile', rep: 0, attempt }, async (d, host, markerAt) => {
    const markerWall = d.t0Wall + (markerAt - d.t0);
    await host.stop();
    await d.agent!.waitFor((e) => e.event === 'profile-recorded', lab.opts.profileWindow.ms + 120_000);
    const p = JSON.parse(fs.readFileSync(file, 'utf8')) as { region_size: number; image_regions: number; regions: number[]; ended_at: string; stop_reason: string | null };
    return {
      link: lab.rate.label,
      size: img.size,
      file,
      toMarkerS: (markerAt - d.t0) / 1000,
      regions: p.regions.length,
      regionSize: p.region_size,
      imageRegions: p.image_regions,
      stopReason: p.stop_reason,
      endedAfterMarkerS: (Date.parse(p.ended_at) - markerWall) / 1000,
      order: p.regions,
      load1: load,
    };
  });
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
async function bootedDeployment(lab: Lab, mode: Mode, img: BenchImage, waitMarker = true): Promise<{ d: Deployment; marker: Promise<number>; stopHost: () => Promise<void> }> {
  const d = await deploy(lab, mode, img);
  const host = startHost(d, img);
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

async function ioRuns(lab: Lab, img: BenchImage, rep: number, order: Mode[]): Promise<IoRun[]> {
  const out: IoRun[] = [];
  const size = img.size;
  for (const mode of order) {
    // The same agent and disk as streaming once the host has booted: a profile only
    // reorders the copy, which the timing runs measure.
    if (mode === 'streaming-profile') continue;
    if (mode === 'streaming') {
      // One deployment per "during" job, each started as soon as the export answers, while
      // the host boots: at 1 Gbit/s a 1 GiB image is mostly local by the boot marker, so
      // measuring from the marker would leave too little of the hydration to measure. The
      // last deployment is then left to finish hydrating for the "after" jobs.
      for (const [i, job] of IO_JOBS.entries()) {
        const { d, marker, stopHost } = await bootedDeployment(lab, mode, img, false);
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
    const { d, stopHost } = await bootedDeployment(lab, mode, img);
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
  agentFetchedAtMarker: number | null;
  qemuCpuS: number;
  agentCpuS: number | null;
  guestReadBytes: number | null;
  guestReadOps: number | null;
  guestWriteBytes: number | null;
  /** The guest's read latencies summed until the marker (BlockStats.readWaitS), median. */
  guestReadWaitS: number | null;
  runs: number[];
}

/** One table's worth: a link rate and an image size. */
interface Case {
  link: RateSpec;
  size: number;
  m: Partial<Record<Mode, ModeMedians>>;
}

function medians(opts: Options, runs: BootRun[], link: RateSpec, size: number): Case {
  const m: Case['m'] = {};
  for (const mode of opts.modes) {
    const rs = runs.filter((r) => r.size === size && r.link === link.label && r.mode === mode);
    if (!rs.length) continue;
    const md = (f: (r: BootRun) => number): number => median(rs.map(f));
    const mn = (f: (r: BootRun) => number | null | undefined): number | null => (rs.some((r) => f(r) != null) ? median(rs.map((r) => f(r) ?? NaN)) : null);
    m[mode] = {
      toMarkerS: md((r) => r.toMarkerS),
      toQemuS: md((r) => r.toQemuS),
      qemuToMarkerS: md((r) => r.qemuToMarkerS),
      wireAtMarker: md((r) => r.wireAtMarker),
      wireTotal: md((r) => r.wireTotal),
      imageLocalS: mn((r) => r.imageLocalS),
      hydratedAtMarker: mn((r) => r.hydratedAtMarker),
      agentFetchedAtMarker: mn((r) => r.agentFetchedAtMarker),
      qemuCpuS: md((r) => r.qemuCpuS),
      agentCpuS: mn((r) => r.agentCpuS),
      guestReadBytes: mn((r) => r.guest?.readBytes),
      guestReadOps: mn((r) => r.guest?.readOps),
      guestWriteBytes: mn((r) => r.guest?.writeBytes),
      guestReadWaitS: mn((r) => r.guest?.readWaitS),
      runs: rs.map((r) => r.toMarkerS),
    };
  }
  return { link, size, m };
}

const toMarker = (c: Case, mode: Mode): number => c.m[mode]?.toMarkerS ?? NaN;

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

function ioMedians(opts: Options, runs: IoRun[]): IoMedian[] {
  return IO_ROWS.filter(([mode]) => opts.modes.includes(mode)).map(([mode, phase]) => {
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

/** Issue #7's goals, from the busybox runs (read by bench/summary.ts). */
interface Goals {
  copyFirstOverStreaming: { size: number; link: string; ratio: number; goal: number; met: boolean; note?: string } | null;
  streamingOverLocal: { size: number; link: string; ratio: number; goal: number; met: boolean }[];
}

function goals(cases: Case[]): Goals {
  // The copy-first goal is stated for 8 GiB at 1 Gbit/s: that case if it ran, else the
  // largest image at the rate nearest 1 Gbit/s, with a note.
  const byFit = [...cases].sort((a, b) => Math.abs(a.link.rate - 125e6) - Math.abs(b.link.rate - 125e6) || b.size - a.size);
  const c = byFit.find((x) => x.size === 8 * GiB && Math.abs(x.link.rate - 125e6) <= 1) ?? byFit[0];
  const notes: string[] = [];
  if (c && c.size !== 8 * GiB) notes.push(`no 8 GiB run: figure for ${sizeLabel(c.size)}`);
  if (c && Math.abs(c.link.rate - 125e6) > 1) notes.push(`link is ${c.link.label}, the goal is stated for 1gbit`);
  const r = c ? toMarker(c, 'copy-first') / toMarker(c, 'streaming') : NaN;
  return {
    copyFirstOverStreaming: c && Number.isFinite(r) ? { size: c.size, link: c.link.label, ratio: r, goal: 10, met: r >= 10, ...(notes.length ? { note: notes.join('; ') } : {}) } : null,
    streamingOverLocal: cases
      .map((x) => ({ size: x.size, link: x.link.label, ratio: toMarker(x, 'streaming') / toMarker(x, 'local'), goal: 1.05, met: false }))
      .filter((x) => Number.isFinite(x.ratio))
      .map((x) => ({ ...x, met: x.ratio <= 1.05 })),
  };
}

interface WorkingSetMedian {
  link: string;
  runs: number;
  toMarkerS: number;
  fetched: number;
  regionsLocal: number;
  regionSize: number;
  wireAtMarker: number;
  guestReadBytes: number | null;
  guestReadOps: number | null;
  guestWriteBytes: number | null;
  guestWriteOps: number | null;
}

function workingSetMedians(opts: Options, runs: WorkingSetRun[]): WorkingSetMedian[] {
  return opts.rates
    .map((link) => runs.filter((r) => r.link === link.label))
    .filter((rs) => rs.length)
    .map((rs) => {
      const mn = (f: (r: WorkingSetRun) => number | undefined): number | null => (rs.some((r) => f(r) !== undefined) ? median(rs.map((r) => f(r) ?? NaN)) : null);
      return {
        link: rs[0]!.link,
        runs: rs.length,
        toMarkerS: median(rs.map((r) => r.toMarkerS)),
        fetched: median(rs.map((r) => r.fetched)),
        regionsLocal: median(rs.map((r) => r.regionsLocal)),
        regionSize: rs[0]!.regionSize,
        wireAtMarker: median(rs.map((r) => r.wireAtMarker)),
        guestReadBytes: mn((r) => r.guest?.readBytes),
        guestReadOps: mn((r) => r.guest?.readOps),
        guestWriteBytes: mn((r) => r.guest?.writeBytes),
        guestWriteOps: mn((r) => r.guest?.writeOps),
      };
    });
}

// ---------------------------------------------------------------- rendering

const s1 = (x: number | null): string => (x === null || !Number.isFinite(x) ? '–' : x.toFixed(x >= 100 ? 0 : 1));
const s2 = (x: number): string => (Number.isFinite(x) ? x.toFixed(2) : '–');
const caseLabel = (opts: Options, c: Case, img: string): string => (opts.rates.length > 1 ? `${img}, ${rateLabel(c.link.rate)}` : img);

function renderBootTable(opts: Options, c: Case, markerName: string, realOs: boolean): string {
  const modes = opts.modes.filter((mode) => c.m[mode]);
  const guest = (x: ModeMedians): string =>
    x.guestReadBytes === null ? '–' : `${fmtBytes(x.guestReadBytes)} in ${fmtNum(x.guestReadOps ?? NaN, 0)} reads; wrote ${fmtBytes(x.guestWriteBytes ?? NaN)}`;
  return markdownTable(
    [
      'mode', `deploy → ${markerName} (s)`, 'deploy → QEMU start (s)', `QEMU start → ${markerName} (s)`, `QEMU CPU until the ${markerName} (s)`, '× local',
      ...(realOs ? ['× network-only', `guest I/O until the ${markerName} (QEMU's counters)`, 'guest read wait (s)'] : []),
      `on the wire until the ${markerName}`, 'on the wire in total', 'deploy → image all local (s)', 'every run (s)',
    ],
    ['l', 'r', 'r', 'r', 'r', 'r', ...(realOs ? (['r', 'l', 'r'] as const) : []), 'r', 'r', 'r', 'l'],
    modes.map((mode) => {
      const x = c.m[mode]!;
      const hyd = x.hydratedAtMarker !== null ? ` (${(x.hydratedAtMarker * 100).toFixed(0)}% local at the ${markerName})` : '';
      return [
        `${mode}`,
        `**${s2(x.toMarkerS)}**`,
        s2(x.toQemuS),
        s2(x.qemuToMarkerS),
        s2(x.qemuCpuS),
        ratio(x.toMarkerS, toMarker(c, 'local')),
        ...(realOs ? [ratio(x.toMarkerS, toMarker(c, 'network-only')), guest(x), x.guestReadWaitS === null ? '–' : s2(x.guestReadWaitS)] : []),
        fmtBytes(x.wireAtMarker) + hyd,
        mode === 'network-only' ? `${fmtBytes(x.wireTotal)} (and every later read)` : fmtBytes(x.wireTotal),
        mode === 'network-only' ? 'never' : mode === 'local' ? '0 (already)' : s1(x.imageLocalS),
        x.runs.map((t) => t.toFixed(2)).join(', '),
      ];
    }),
  );
}

function renderRatios(opts: Options, cases: Case[], g: Goals): string {
  const rows = cases.map((c) => [
    caseLabel(opts, c, sizeLabel(c.size)),
    `**${ratio(toMarker(c, 'copy-first'), toMarker(c, 'streaming'))}**`,
    `**${ratio(toMarker(c, 'streaming'), toMarker(c, 'local'))}**`,
    ratio(toMarker(c, 'network-only'), toMarker(c, 'local')),
    ratio(toMarker(c, 'copy-first'), toMarker(c, 'local')),
  ]);
  const cf = g.copyFirstOverStreaming;
  const lines = [
    markdownTable(['image', 'copy-first / streaming', 'streaming / local', 'network-only / local', 'copy-first / local'], ['l', 'r', 'r', 'r', 'r'], rows),
    '',
    'Goals (issue #7):',
    '',
  ];
  if (cf) lines.push(`- copy-first ≥ 10× slower than streaming to the boot marker, ${sizeLabel(cf.size)} at ${cf.link}: **${cf.ratio.toFixed(2)}× — ${cf.met ? 'met' : 'missed'}**${cf.note ? ` (${cf.note})` : ''}.`);
  for (const s of g.streamingOverLocal) lines.push(`- streaming ≤ 1.05× a local-disk boot, ${sizeLabel(s.size)}${opts.rates.length > 1 ? ` at ${s.link}` : ''}: **${s.ratio.toFixed(3)}× — ${s.met ? 'met' : 'missed'}**.`);
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

function hostLine(img: BenchImage): string {
  const fw = img.boot.firmware === 'ovmf' ? ' -drive if=pflash,…OVMF_CODE_4M.fd -drive if=pflash,…(fresh OVMF_VARS per boot)' : '';
  const dev = img.boot.firmware === 'ovmf' ? 'nvme,drive=d0,serial=smartnic0,bootindex=0' : 'nvme,drive=d0,serial=smartnic0';
  const nic = img.boot.network ? ' -netdev user,id=n0 -device virtio-net-pci,netdev=n0,romfile=' : '';
  return `\`qemu-system-x86_64 -machine q35 -m ${img.boot.memoryMiB} -nographic -nodefaults -serial stdio -monitor none
  -no-reboot${fw} -drive file=nbd:unix:SOCK,if=none,id=d0,format=raw -device ${dev}${nic}
  -boot c -qmp unix:QMP,server=on,wait=off\`, TCG (no KVM here), stopped at the ${img.markerName}`;
}

interface RenderCommon {
  opts: Options;
  cmd: string;
  date: string;
  m: MachineInfo;
  nginx: string;
  raw: string;
  pngs: (string | null)[];
  /** The boot profiles the streaming-profile rounds replayed, one per image and rate. */
  recordings: ProfileRecording[];
  /** Boots given up on (and run again). */
  hung: HungBoot[];
}

/** The header's line on the profiles streaming-profile replayed (empty without the mode). */
function renderRecordings(recs: ProfileRecording[], img: BenchImage, opts: Options): string {
  if (!recs.length) return '';
  const one = (p: ProfileRecording): string =>
    `${rateLabel(parseRateArg(p.link, 'link'))}${opts.image === 'busybox' ? ` ${sizeLabel(p.size)}` : ''}: ${p.regions} regions of ${fmtBytes(p.regionSize)} (of ${p.imageRegions}), from a boot to the ${img.markerName} in ${p.toMarkerS.toFixed(1)} s; the window ended ${p.endedAfterMarkerS.toFixed(0)} s after the ${img.markerName}${p.endedAfterMarkerS < 0 ? ' (before it: the end of the boot is not in the profile)' : ''}`;
  return `- Boot profiles (streaming-profile): each recorded once per ${opts.image === 'busybox' ? 'size and rate' : 'rate'} before the rounds by a streaming boot with
  \`--record-profile FILE --profile-window ${opts.profileWindow.arg}\`, QEMU stopped at the ${img.markerName} as in every run (so
  the profile holds the reads up to it), the recording ended by its window; every round replays it.
${recs.map((p) => `  ${one(p)}.`).join('\n')}
`;
}

/** The header's words on boots that hung (empty when none did). */
function renderHung(hung: readonly HungBoot[], img: BenchImage): string {
  if (!hung.length) return '';
  const each = hung.map((h) => `${hungName(h)} (after ${h.guest ? `${fmtNum(h.guest.readOps, 0)} reads` : 'an unknown number of reads'}, ${h.timeoutS} s)`).join('; ');
  return `\n- Hung boots, not counted and booted again: ${each}. Each stopped short of the ${img.markerName}; the raw results hold each one's serial console tail.`;
}

function header(p: RenderCommon, heading: string, img: BenchImage, imageText: string): string {
  const { opts } = p;
  const links = opts.rates.map((r) => `\`tc tbf rate ${r.label}\``).join(', then ');
  return `${heading}

Generated by \`bench/deploy-modes.ts\`; re-run it to update this section (the rest of the file is
left alone).

- Command: \`${p.cmd}\`
- Date: ${p.date}
- Machine: ${describeMachine(p.m)}; ${p.nginx}
- Link: veth pair into a network namespace shaped with ${links} both ways
  (lab/netns.ts); the origin is nginx-light (sendfile, Range) inside the namespace. Bytes on
  the wire are the host-side veth's rx_bytes (payload plus TCP/IP headers).
- Image: ${imageText}
- Host: ${hostLine(img)}.
- Modes (the clock starts when the first process of the mode is spawned; each export is
  polled every 10 ms for its NBD greeting before QEMU starts):
${opts.modes.map((mode) => `  - **${mode}**: ${MODE_SPECS[mode].how(img)}`).join('\n')}${opts.agentArgs.length ? `\n  - streaming's extra flags: \`${opts.agentArgs.join(' ')}\`` : ''}
${renderRecordings(p.recordings, img, opts)}- ${opts.reps} round(s) per ${opts.image === 'busybox' ? 'size and rate' : 'rate'}, every mode once per round, mode order rotated per round; tables show medians.${renderHung(p.hung, img)}
- Raw runs and the goal figures: \`${p.raw}\``;
}

function renderSection(p: RenderCommon & { img: BenchImage; cases: Case[]; g: Goals; io: IoMedian[]; ioSize: number }): string {
  const { opts } = p;
  const img = p.pngs.filter((x): x is string => !!x).map((f) => `![${path.basename(f, '.png')}](${path.relative('docs', f)})`).join('\n');
  const imageText = `the boot fixture (MBR, FAT with SYSLINUX + Debian kernel + busybox initramfs that
  prints \`SMARTNIC-BOOT-OK\`) padded with incompressible bytes to each size; the boot
  itself reads a few tens of MB of it.`;
  return `${header(p, SECTION, p.img, imageText)}

${p.cases.map((c) => `### ${caseLabel(opts, c, `${sizeLabel(c.size)} image`)}\n\n${renderBootTable(opts, c, 'boot marker', false)}`).join('\n\n')}

### Ratios of the medians

${renderRatios(opts, p.cases, p.g)}

${opts.io ? `### Disk I/O of the booted host (${sizeLabel(p.ioSize)} image${opts.rates.length > 1 ? `, ${opts.rates[0]!.label}` : ''})

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

function renderRealOsRatios(opts: Options, cases: Case[], g: RealOsGoals): string {
  const profile = opts.modes.includes('streaming-profile');
  const rows = cases.map((c) => [
    rateLabel(c.link.rate),
    `**${ratio(toMarker(c, 'streaming'), toMarker(c, 'network-only'))}**`,
    ...(profile ? [`**${ratio(toMarker(c, 'streaming-profile'), toMarker(c, 'local'))}**`] : []),
    ratio(toMarker(c, 'streaming'), toMarker(c, 'local')),
    ratio(toMarker(c, 'network-only'), toMarker(c, 'local')),
    ratio(toMarker(c, 'copy-first'), toMarker(c, 'local')),
    ratio(toMarker(c, 'copy-first'), toMarker(c, 'streaming')),
  ]);
  const lines = [
    markdownTable(
      ['link', 'streaming / network-only', ...(profile ? ['streaming with a profile / local'] : []), 'streaming / local', 'network-only / local', 'copy-first / local', 'copy-first / streaming'],
      ['l', 'r', ...(profile ? (['r'] as const) : []), 'r', 'r', 'r', 'r'],
      rows,
    ),
    '',
    'Goals (issue #14), deploy → login prompt:',
    '',
  ];
  for (const s of g.streamingOverNetworkOnly) lines.push(`- without a profile, streaming ≤ network-only at ${rateLabel(s.bitsPerSecond / 8)}: **${s.ratio.toFixed(3)}× — ${s.met ? 'met' : 'missed'}**.`);
  if (g.profileOverLocal) {
    for (const s of g.profileOverLocal) lines.push(`- with a boot profile, ≤ 1.05× a local boot at ${rateLabel(s.bitsPerSecond / 8)}: **${s.ratio.toFixed(3)}× — ${s.met ? 'met' : 'missed'}**.`);
  } else {
    lines.push('- with a boot profile, ≤ 1.05× a local boot: not measured in this run (its `--modes` left out `streaming-profile`, or `local`).');
  }
  return lines.join('\n');
}

function renderWorkingSet(img: BenchImage, ws: WorkingSetMedian[]): string {
  const per = (b: number | null, n: number | null): string => (b === null || n === null || !n ? '–' : fmtBytes(b / n));
  return markdownTable(
    ['link', 'runs', 'deploy → login prompt, no background copy (s)', 'the guest read', 'mean read', 'the guest wrote', 'regions fetched', 'fetched', 'fetched / read', 'fetched / image', 'on the wire'],
    ['l', 'r', 'r', 'l', 'r', 'l', 'r', 'r', 'r', 'r', 'r'],
    ws.map((w) => [
      rateLabel(parseRateArg(w.link, 'link')),
      String(w.runs),
      s2(w.toMarkerS),
      w.guestReadBytes === null ? '–' : `${fmtBytes(w.guestReadBytes)} in ${fmtNum(w.guestReadOps ?? NaN, 0)} requests`,
      per(w.guestReadBytes, w.guestReadOps),
      w.guestWriteBytes === null ? '–' : `${fmtBytes(w.guestWriteBytes)} in ${fmtNum(w.guestWriteOps ?? NaN, 0)} requests`,
      `${fmtNum(w.regionsLocal, 0)} × ${fmtBytes(w.regionSize)}`,
      fmtBytes(w.fetched),
      w.guestReadBytes ? `${(w.fetched / w.guestReadBytes).toFixed(2)}×` : '–',
      `${((100 * w.fetched) / img.size).toFixed(1)}%`,
      fmtBytes(w.wireAtMarker),
    ]),
  );
}

function renderRealOsSection(p: RenderCommon & { img: BenchImage; cases: Case[]; g: RealOsGoals; ws: WorkingSetMedian[] }): string {
  const { opts, img } = p;
  const pngs = p.pngs.filter((x): x is string => !!x).map((f) => `![${path.basename(f, '.png')}](${path.relative('docs', f)})`).join('\n');
  const imageText = `${img.label} of tests/fixtures/make-debian-image.sh (GPT; GRUB on a FAT
  ESP; ext4 root; the cloud kernel, systemd, cloud-init, OpenSSH), raw, ${fmtBytes(img.allocated)} of it
  allocated, the rest holes that every mode moves as zeros (no manifest). Every run boots a
  pristine copy, so every boot is a first boot (machine-id, SSH host keys, cloud-init); the
  clock stops at the serial console's \`login:\` prompt (LOGIN_PROMPT).`;
  return `${header(p, SECTION_REAL_OS, img, imageText)}
- Rates: ${opts.rates.map((r) => rateLabel(r.rate)).join(' and ')}. TCG boots ~10× slower than hardware, so a
  100 Mbit/s link keeps roughly the ratio of boot time to wire time a real host has on 1 Gbit/s.
- The guest's I/O is QEMU's own counters of the NVMe disk (QMP \`query-blockstats\`) at the
  prompt. Streaming's background copy runs during the boot, so what it fetched by the prompt
  is not the boot's working set: the working-set runs below are streaming boots with
  \`--no-hydrate\` (fetch only what the host reads).
- Guest read wait: QEMU's \`rd_total_time_ns\`, the latencies of the guest's reads summed
  until the prompt. It is what the disk cost the boot (an upper bound: reads in flight together
  count each) and far steadier than the boot's wall time, which under TCG follows the CPU QEMU
  gets (QEMU is busy for the whole boot in every mode: its CPU seconds ≈ the wall time).

${p.cases.map((c) => `### ${rateLabel(c.link.rate)}\n\n${renderBootTable(opts, c, 'login prompt', true)}`).join('\n\n')}

### Ratios of the medians

${renderRealOsRatios(opts, p.cases, p.g)}

${p.ws.length ? `### The boot's read working set

Streaming boots with no background copy (\`dpu-agent stream … --no-hydrate\`): the agent
fetches exactly the regions the boot reads, so its bytes fetched at the prompt (its progress
line once QEMU has stopped) are the working set in whole regions; QEMU's counters are the same
boot as the guest asked for it (re-reads included).

${renderWorkingSet(img, p.ws)}
` : '(working-set runs skipped: --working-set 0)\n'}${pngs ? `\n${pngs}\n` : ''}`;
}

function plots(opts: Options, cases: Case[], io: IoMedian[], ioSize: number): (string | null)[] {
  const modes = opts.modes.filter((m) => cases.some((c) => c.m[m]));
  return [
    plot({
      file: 'bench-deploy-modes-boot.png',
      title: `Deploy → boot marker over ${opts.rates.map((r) => rateLabel(r.rate)).join(' / ')} (median, lower is better)`,
      xlabel: 'image size',
      ylabel: 'seconds',
      categories: cases.map((c) => caseLabel(opts, c, sizeLabel(c.size))),
      series: modes.map((mode) => ({ title: mode, points: cases.map((c, i): [number, number] => [i, toMarker(c, mode)]) })),
    }),
    // No I/O plot without I/O runs (--no-io): the old PNG stays as it was.
    !opts.io ? null : plot({
      file: 'bench-deploy-modes-io.png',
      title: `Disk of the booted host, ${sizeLabel(ioSize)} image (higher is better)`,
      xlabel: '',
      ylabel: 'IOPS  |  MB/s',
      categories: io.map((r) => `${r.mode}${r.phase === 'during' ? ' (during)' : ''}`),
      series: [
        { title: '4K random read QD1 (IOPS)', points: io.map((r, i): [number, number] => [i, r.iops]) },
        { title: '1 MiB seq read QD8 (MB/s)', points: io.map((r, i): [number, number] => [i, r.mbps]) },
      ],
      extra: ['set xtics font ",9"'],
    }),
  ];
}

function realOsPlots(opts: Options, cases: Case[]): (string | null)[] {
  const modes = opts.modes.filter((m) => cases.some((c) => c.m[m]));
  return [
    plot({
      file: 'bench-deploy-modes-real-os.png',
      title: 'Debian 12 (UEFI): deploy → login prompt (median, lower is better)',
      xlabel: 'link',
      ylabel: 'seconds',
      categories: cases.map((c) => rateLabel(c.link.rate)),
      series: modes.map((mode) => ({ title: mode, points: cases.map((c, i): [number, number] => [i, toMarker(c, mode)]) })),
    }),
  ];
}

// ---------------------------------------------------------------- main

function logRun(log: (s: string) => void, what: string, r: BootRun, markerName: string): void {
  const g = r.guest ? `  guest read ${fmtBytes(r.guest.readBytes)} in ${r.guest.readOps} requests` : '';
  log(
    `  ${what} ${r.mode.padEnd(12)} ${markerName} ${r.toMarkerS.toFixed(2).padStart(7)} s (QEMU at ${r.toQemuS.toFixed(2)} s + ${r.qemuToMarkerS.toFixed(2)} s)` +
      ` QEMU CPU ${r.qemuCpuS.toFixed(2)} s${r.agentCpuS !== null ? `, agent CPU ${r.agentCpuS.toFixed(2)} s` : ''}, load ${r.load1}` +
      `  wire ${fmtBytes(r.wireAtMarker)} / ${fmtBytes(r.wireTotal)}${r.imageLocalS !== null ? `  all local at ${r.imageLocalS.toFixed(1)} s` : ''}${g}`,
  );
}

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
  const what = opts.image === 'debian' ? 'the Debian 12 image' : `sizes ${opts.sizes.map(sizeLabel).join(', ')}`;
  log(`deploy-modes: ${what}, links ${opts.rates.map((r) => r.label).join(', ')}, modes ${opts.modes.join(', ')}, ${opts.reps} round(s); work dir ${dir}`);

  const link = EmulatedLink.create({ index: opts.linkIndex, rate: opts.rates[0]!.rate });
  let origin: ChildProcess | null = null;
  onCleanup(async () => {
    if (origin) await stopChild(origin);
    await link.destroy();
  });
  const root = path.join(dir, 'origin');
  fs.mkdirSync(root, { recursive: true });
  const o = await startNginxOrigin(link, dir, root);
  origin = o.child;
  const lab: Lab = { opts, dir, link, rate: opts.rates[0]!, seq: 0, profile: null };
  log(`  link ${link.ns} (${link.hostIf} ⇄ ${link.nsIf}); nginx pid ${o.child.pid} at ${o.base}`);

  const images = opts.image === 'debian' ? [debianImage(root, o.base)] : opts.sizes.map((s) => busyboxImage(root, o.base, s));
  const bootRuns: BootRun[] = [];
  const hung: HungBoot[] = [];
  const wsRuns: WorkingSetRun[] = [];
  const recordings: ProfileRecording[] = [];
  const io: IoRun[] = [];
  try {
    for (const img of images) {
      await buildImage(img, log);
      const head = await fetch(img.url, { method: 'HEAD' });
      if (Number(head.headers.get('content-length')) !== img.size) throw new Error(`origin serves ${head.headers.get('content-length')} bytes for ${img.url}, expected ${img.size}`);

      for (const rate of opts.rates) {
        lab.rate = rate;
        link.setRate(rate.rate);
        const where = `${img.kind === 'debian' ? '' : `${sizeLabel(img.size)} `}${rate.label}`;
        const tag = (round: number): string => `${where} round ${round}`;
        lab.profile = null;
        if (opts.modes.includes('streaming-profile')) {
          const p = await bootAgainIfHung(hung, log, img.markerName, (attempt) => recordProfile(lab, img, hangTimeoutMs(img, bootRuns, rate.label), attempt));
          recordings.push(p);
          lab.profile = p;
          log(
            `  ${where} boot profile: ${p.regions} regions of ${fmtBytes(p.regionSize)} (${fmtBytes(p.regions * p.regionSize)} of ${p.imageRegions}) from a streaming boot to the ${img.markerName} in ${p.toMarkerS.toFixed(2)} s; ` +
              `the window (${opts.profileWindow.arg}) ended ${p.endedAfterMarkerS.toFixed(1)} s after the ${img.markerName}${p.endedAfterMarkerS < 0 ? ' — BEFORE it: the end of the boot is not in the profile; raise --profile-window' : ''}; load ${p.load1}`,
          );
          await sleep(500);
        }
        for (let round = 1; round <= opts.reps; round++) {
          for (const mode of roundOrder(opts.modes, round)) {
            const r = await bootAgainIfHung(hung, log, img.markerName, (attempt) => bootRun(lab, mode, img, round, hangTimeoutMs(img, bootRuns, rate.label), attempt));
            bootRuns.push(r);
            logRun(log, tag(round), r, img.markerName);
            await sleep(500);
          }
        }
        for (let i = 1; i <= opts.workingSet; i++) {
          const w = await bootAgainIfHung(hung, log, img.markerName, (attempt) => workingSetRun(lab, img, i, hangTimeoutMs(img, bootRuns, rate.label), attempt));
          wsRuns.push(w);
          log(
            `  ${rate.label} working set ${i}: login prompt ${w.toMarkerS.toFixed(2)} s with no background copy; fetched ${fmtBytes(w.fetched)} (${w.regionsLocal} regions of ${fmtBytes(w.regionSize)})` +
              `${w.guest ? `; the guest read ${fmtBytes(w.guest.readBytes)} in ${w.guest.readOps} requests, wrote ${fmtBytes(w.guest.writeBytes)} in ${w.guest.writeOps}` : ''}; load ${w.load1}`,
          );
          await sleep(500);
        }
        // fio: on the smallest busybox image at the first rate, as before rates were a list.
        if (opts.io && img === images[0] && rate === opts.rates[0]) {
          for (let round = 1; round <= opts.reps; round++) io.push(...(await ioRuns(lab, img, round, roundOrder(opts.modes, round))));
        }
      }
      if (!opts.keep) fs.rmSync(img.file, { force: true });
    }
  } catch (err) {
    // Runs already done are kept: a failure late in an hour-long bench loses nothing measured.
    if (bootRuns.length || wsRuns.length || hung.length) {
      const partial = writeResults(`deploy-modes-partial-${opts.image}`, date, { command: cmd, date: date.toISOString(), options: opts, failedWith: (err as Error).message, bootRuns, hungBoots: hung, workingSetRuns: wsRuns, profileRecordings: recordings, ioRuns: io });
      log(`the runs done before the failure are in ${partial}`);
    }
    throw err;
  }

  const cases = images.flatMap((img) => opts.rates.map((rate) => medians(opts, bootRuns, rate, img.size)));
  const common = { command: cmd, date: date.toISOString(), quick: opts.quick, options: opts, machine: m, nginx: nginxV };
  const rc: Omit<RenderCommon, 'raw' | 'pngs'> = { opts, cmd, date: date.toISOString(), m, nginx: nginxV, recordings, hung };
  let section: string;
  let heading: string;
  let raw: string;
  if (opts.image === 'debian') {
    const img = images[0]!;
    const g = realOsGoals(cases.map((c) => ({ link: c.link.label, bitsPerSecond: c.link.rate * 8, toMarkerS: Object.fromEntries(Object.entries(c.m).map(([k, v]) => [k, v.toMarkerS])) })));
    const ws = workingSetMedians(opts, wsRuns);
    raw = writeResults('deploy-modes-debian', date, {
      ...common,
      image: { file: path.basename(img.file), size: img.size, allocated: img.allocated, firmware: img.boot.firmware },
      summary: {
        goals: g,
        workingSet: ws,
        medians: cases.map((c) => ({ link: c.link.label, bitsPerSecond: c.link.rate * 8, modes: c.m })),
      },
      bootRuns,
      hungBoots: hung,
      workingSetRuns: wsRuns,
      profileRecordings: recordings,
    });
    const pngs = opts.docs ? realOsPlots(opts, cases) : [];
    heading = SECTION_REAL_OS;
    section = renderRealOsSection({ ...rc, raw, pngs, img, cases, g, ws });
  } else {
    const g = goals(cases);
    const iom = ioMedians(opts, io);
    const ioSize = opts.sizes[0]!;
    raw = writeResults('deploy-modes', date, {
      ...common,
      summary: {
        linkBitsPerSecond: opts.rates[0]!.rate * 8,
        goals: g,
        medians: Object.fromEntries(cases.map((c) => [opts.rates.length > 1 ? `${c.link.label}/${c.size}` : String(c.size), c.m])),
        io: iom,
      },
      bootRuns,
      hungBoots: hung,
      ioRuns: io,
      ...(recordings.length ? { profileRecordings: recordings } : {}),
    });
    const pngs = opts.docs ? plots(opts, cases, iom, ioSize) : [];
    heading = SECTION;
    section = renderSection({ ...rc, raw, pngs, img: images[0]!, cases, g, io: iom, ioSize });
  }
  console.log(section);
  if (opts.docs) {
    updateDocSection(heading, section);
    log(`updated ${path.relative(REPO, DOC)}; raw runs in ${raw}`);
  } else {
    log(`raw runs in ${raw} (docs/ not touched${opts.quick ? ': --quick' : ''})`);
  }
}

runMain('deploy-modes', main);

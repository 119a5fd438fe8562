/**
 * `dpu-agent stream`: serves one streaming disk in the foreground. Progress goes to stderr
 * as a bar on a terminal, or to stdout as JSON lines otherwise (one object per line with
 * an "event" field: listening, progress, complete, profile-recorded, stopped, error).
 *
 * Boot profiles are the daemon's (streaming/boot-profile.ts), for this one disk: a profile
 * to replay (--boot-profile) is checked and queued, and the recorder (--record-profile)
 * attached, before the export listens — so before any host read — and hydration starts
 * after both.
 */
import { pino, type Logger } from 'pino';
import fs from 'node:fs';
import path from 'node:path';
import { DpuError } from '../../../image-access/src/errors.js';
import { Manifest } from '../../../image-access/src/manifest.js';
import { NbdServer, parseEndpoint } from '../nbd/server.js';
import { loadNbdTls, type NbdTls, type TlsMode } from '../nbd/tls.js';
import { ConfigError } from '../../../common/src/config-error.js';
import { redactHeaders, redactUrl } from '../../../image-access/src/redact.js';
import { HashWorkers } from '../../../image-access/src/hash-workers.js';
import { DEFAULT_REGION_SIZE, IMAGE_FORMATS, type ImageFormat, openStreamingDisk, type OpenedDisk, plannedRegionSize } from '../streaming/open.js';
import { writeJsonAtomic } from '../local/atomic-file.js';
import {
  applyReplay,
  type BootProfileStatus,
  type BootRecorder,
  bootProfileStatus,
  MAX_PROFILE_REGIONS,
  readReplayProfile,
  RECORDING_DEFAULTS,
  type RecordedProfile,
  recordBoot,
  replayProblem,
  type ReplayProfile,
  type ReplayStatus,
} from '../streaming/boot-profile.js';
import { type FlagTable, type FlagValues, parseFlags, renderHelp } from './flags.js';
import { formatBytes } from './units.js';

export const STREAM_FLAGS: FlagTable = {
  source: { kind: 'string', arg: 'URL', required: true, help: 'HTTP(S) URL of the image (Swift temp URL, Glance download URL, any server that honours Range).' },
  format: {
    kind: 'string',
    arg: 'raw|qcow2|auto',
    default: 'raw',
    help: 'Format of the image at the source. qcow2 (version 2 or 3, zlib-compressed clusters, no backing file or encryption) is served as the raw disk it describes, and the target ends as that raw disk; auto detects qcow2 by its magic.',
  },
  header: { kind: 'list', arg: '"NAME: VALUE"', help: 'Extra request header for the source, e.g. "X-Auth-Token: …". Values are never logged.' },
  target: { kind: 'string', arg: 'PATH', required: true, help: 'Local target: a block device or a file (created sparse at the image size if missing).' },
  state: { kind: 'string', arg: 'DIR', required: true, help: 'State directory: region map, disk record, lock. Reusing it resumes without re-fetching local regions.' },
  listen: { kind: 'string', arg: 'unix:PATH|tcp:HOST:PORT', required: true, help: 'Where the NBD export listens. Prefer a unix socket; over TCP use TLS (--tls-cert), as NBD alone has no authentication.' },
  'tls-cert': { kind: 'string', arg: 'FILE', help: 'Offer TLS (NBD_OPT_STARTTLS) with this PEM certificate; clients then connect with nbds://. Needs --tls-key.' },
  'tls-key': { kind: 'string', arg: 'FILE', help: 'Unencrypted PEM private key of --tls-cert; keep it mode 0600.' },
  'tls-ca': { kind: 'string', arg: 'FILE', help: 'PEM CA certificate(s) that client certificates must chain to; needs --tls-verify-peer.' },
  'tls-mode': { kind: 'string', arg: 'require|allow', help: 'With --tls-cert: require (the default) refuses every option before STARTTLS with NBD_REP_ERR_TLS_REQD; allow serves plaintext clients too.' },
  'tls-verify-peer': { kind: 'boolean', help: 'Require a client certificate signed by --tls-ca (mutual TLS). Without it TLS encrypts but serves any client.' },
  'export-name': { kind: 'string', arg: 'NAME', default: 'disk', help: 'Name of the export; the empty name also selects it.' },
  'region-size': { kind: 'size', arg: 'SIZE', default: String(DEFAULT_REGION_SIZE), help: 'Region size, a power of two from 4K to 1G. Fixed when the state directory is created.' },
  bandwidth: { kind: 'rate', arg: 'RATE', default: '0', min: 0, help: 'Cap on background hydration, e.g. 50M (MiB/s) or 800mbit; 0 for none. Host reads are never capped.' },
  'no-hydrate': { kind: 'boolean', help: 'Fetch only what the host reads; do not copy the rest in the background.' },
  'batch-size': { kind: 'size', arg: 'SIZE', default: '8M', min: 4096, help: 'Largest run of regions one background fetch copies.' },
  'request-time': { kind: 'duration', arg: 'TIME', default: '1ms', min: 0, help: 'Link time one background HTTP request carries at most (sized from the measured link rate, 64K to 8M), so a host miss waits behind little; 0 sends each fetch as one request.' },
  'hydrate-connections': { kind: 'int', arg: 'N', default: '2', min: 1, help: 'Background range requests in flight.' },
  'max-connections': { kind: 'int', arg: 'N', default: '8', min: 2, help: 'HTTP connections to the origin at most; the ones beyond --hydrate-connections are kept for host reads.' },
  'retry-deadline': { kind: 'duration', arg: 'TIME', default: '30s', min: 1, help: 'A range read fails (EIO to the host) when no byte arrived for this long across retries.' },
  'stall-timeout': { kind: 'duration', arg: 'TIME', default: '10s', min: 1, help: 'An attempt is abandoned and retried when the body stops flowing this long.' },
  'commit-interval': { kind: 'duration', arg: 'TIME', default: '1s', min: 10, help: 'Commit the region map at least this often while it changes (FLUSH and FUA always commit).' },
  manifest: { kind: 'string', arg: 'FILE', help: 'A manifest from "dpu-agent manifest": every fetched region is verified against it (a mismatch is fetched again, never served) and its zero regions are not fetched.' },
  'hash-threads': { kind: 'int', arg: 'N', default: '2', min: 0, help: 'Worker threads that check fetched regions against --manifest (SHA-256, ~1 GB/s each), so hashing never delays the host\'s requests; 0 hashes on the thread that serves them.' },
  'boot-profile': {
    kind: 'string',
    arg: 'FILE',
    help: 'Replay a boot profile of this image (what --record-profile writes, or the daemon\'s GET /v1/disks/{id}/boot-profile; region_size and regions are read): its regions are queued before the export listens and copied first, in its order, ahead of the sequential sweep (host misses still go first; with --no-hydrate nothing is copied ahead). Checked as the daemon checks a create request\'s profile: of another region size than the disk\'s, or malformed, the agent exits with DPU_ERR_PROFILE_INVALID before opening the disk; naming a region past the image, the disk is served all the same without the profile (a warning, and bootProfile.replay in the events says "refused" and why).',
  },
  'record-profile': {
    kind: 'string',
    arg: 'FILE',
    help: 'Record the boot profile as the daemon does: the first host read of each image region, in order, from the first host read until --profile-window has passed or --profile-max-regions are recorded; then FILE is written atomically (JSON as the daemon\'s GET /v1/disks/{id}/boot-profile) and a profile-recorded event sent. Records on a resumed --state too. A recording not finished when the agent stops (SIGTERM, SIGINT) is not written; a finished one always is.',
  },
  'profile-window': { kind: 'duration', arg: 'TIME', default: `${RECORDING_DEFAULTS.windowMs / 1000}s`, min: 100, help: 'With --record-profile: the recording ends this long after the first host read.' },
  'profile-max-regions': { kind: 'int', arg: 'N', default: String(RECORDING_DEFAULTS.maxRegions), min: 1, max: MAX_PROFILE_REGIONS, help: 'With --record-profile: the recording ends once it holds this many regions.' },
  'read-only': { kind: 'boolean', help: 'Refuse writes, TRIM and WRITE_ZEROES from the host.' },
  progress: { kind: 'string', arg: 'auto|bar|json|none', default: 'auto', help: 'Progress display: a bar on a terminal, JSON lines on stdout otherwise.' },
  'log-level': { kind: 'string', arg: 'LEVEL', default: 'info', help: 'pino level for the log on stderr: fatal, error, warn, info, debug, trace.' },
};

const USAGE = 'dpu-agent stream --source URL --target PATH --state DIR --listen unix:PATH|tcp:HOST:PORT [options]';
const SUMMARY = `Serve one streaming disk over NBD: reads of regions not yet local are fetched from the
source, and the whole image is copied to the target in the background. SIGTERM or SIGINT
commits the state and exits 0; running again with the same --state resumes.`;

export function streamHelp(): string {
  return renderHelp(USAGE, SUMMARY, STREAM_FLAGS);
}

function readManifest(file: string): Manifest {
  let bytes: Buffer;
  try {
    bytes = fs.readFileSync(file);
  } catch (err) {
    throw new DpuError('DPU_ERR_CONFIG', `--manifest ${file}: ${(err as Error).message}`);
  }
  return Manifest.decode(bytes);
}

/** The --tls-* flags, files read and checked; undefined without --tls-cert. */
export function tlsFromFlags(f: FlagValues): NbdTls | undefined {
  const flag = (field: string): string => `--tls-${field.replace('_', '-')}`;
  if (!f['tls-cert']) {
    const stray = ['tls-key', 'tls-ca', 'tls-mode', 'tls-verify-peer'].find((k) => f[k] !== undefined && f[k] !== false);
    if (stray) throw new DpuError('DPU_ERR_CONFIG', `--${stray} needs --tls-cert and --tls-key: the certificate the export presents and its private key`);
    return undefined;
  }
  if (!f['tls-key']) throw new DpuError('DPU_ERR_CONFIG', '--tls-cert needs --tls-key: the private key of the certificate');
  try {
    return loadNbdTls(
      {
        cert: String(f['tls-cert']),
        key: String(f['tls-key']),
        ca: f['tls-ca'] as string | undefined,
        mode: (f['tls-mode'] ?? 'require') as TlsMode,
        verifyPeer: f['tls-verify-peer'] === true,
      },
      flag,
    );
  } catch (err) {
    if (err instanceof ConfigError) throw new DpuError('DPU_ERR_CONFIG', err.message);
    throw err;
  }
}

export function parseHeaders(list: string[] | undefined): Record<string, string> {
  const out: Record<string, string> = {};
  for (const h of list ?? []) {
    const i = h.indexOf(':');
    if (i <= 0) throw new DpuError('DPU_ERR_CONFIG', `--header "${h.split(':')[0]}…" is not "NAME: VALUE"`);
    out[h.slice(0, i).trim()] = h.slice(i + 1).trim();
  }
  return out;
}

export async function runStream(argv: string[]): Promise<number> {
  const f: FlagValues = parseFlags(STREAM_FLAGS, argv, 'stream');
  if (f['help']) {
    process.stdout.write(streamHelp());
    return 0;
  }
  const level = String(f['log-level']);
  if (!['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'].includes(level)) {
    throw new DpuError('DPU_ERR_CONFIG', `--log-level "${level}" is not one of fatal, error, warn, info, debug, trace, silent`);
  }
  const progressMode = String(f['progress']);
  if (!['auto', 'bar', 'json', 'none'].includes(progressMode)) {
    throw new DpuError('DPU_ERR_CONFIG', `--progress "${progressMode}" is not one of auto, bar, json, none`);
  }
  const format = String(f['format']) as ImageFormat;
  if (!IMAGE_FORMATS.includes(format)) {
    throw new DpuError('DPU_ERR_CONFIG', `--format "${format}" is not one of ${IMAGE_FORMATS.join(', ')}`);
  }
  const endpoint = parseEndpoint(String(f['listen']));
  const tls = tlsFromFlags(f);
  const headers = parseHeaders(f['header'] as string[] | undefined);
  const log: Logger = pino({ level, base: { pid: process.pid } }, pino.destination(2));
  if (endpoint.kind === 'tcp' && !tls) {
    log.warn('the NBD export listens on TCP without TLS: anyone who reaches the port reads and writes the disk, in plaintext; give --tls-cert and --tls-key, or listen on a unix socket');
  } else if (tls?.mode === 'allow') {
    log.warn('--tls-mode allow: clients that do not start TLS are served too');
  }
  const url = String(f['source']);
  const stateDir = String(f['state']);
  const regionSize = argv.some((a) => a.startsWith('--region-size')) ? (f['region-size'] as number) : undefined;
  const replay = f['boot-profile'] ? replayFromFlag(String(f['boot-profile']), stateDir, regionSize) : null;
  const recordTo = recordTarget(f, argv);
  log.info({ source: redactUrl(url), format, headers: redactHeaders(headers), target: f['target'], state: stateDir }, 'opening streaming disk');

  const hashThreads = f['hash-threads'] as number;
  const hashWorkers = f['manifest'] && hashThreads > 0 ? new HashWorkers(hashThreads) : undefined;
  const opened: OpenedDisk = await openStreamingDisk({
    source: {
      url,
      headers,
      maxConnections: f['max-connections'] as number,
      backgroundConnections: f['hydrate-connections'] as number,
      backgroundRequestMs: f['request-time'] as number,
      retryDeadlineMs: f['retry-deadline'] as number,
      stallTimeoutMs: f['stall-timeout'] as number,
    },
    format,
    targetPath: String(f['target']),
    stateDir,
    regionSize,
    hydrator: {
      bandwidth: f['bandwidth'] as number,
      batchBytes: f['batch-size'] as number,
      concurrency: f['hydrate-connections'] as number,
    },
    commitIntervalMs: f['commit-interval'] as number,
    ...(f['manifest'] ? { manifest: readManifest(String(f['manifest'])) } : {}),
    ...(hashWorkers ? { hashWorkers } : {}),
    log,
  });
  const { disk, hydrator } = opened;
  if (f['read-only']) (disk.capabilities as { readOnly: boolean }).readOnly = true;

  const mode = progressMode === 'auto' ? (process.stderr.isTTY ? 'bar' : 'json') : progressMode;
  // Progress is a courtesy: a reader that goes away (`dpu-agent stream … | head`) stops
  // the JSON lines, never the disk.
  let stdoutOpen = true;
  process.stdout.on('error', () => (stdoutOpen = false));
  const emit = (obj: Record<string, unknown>): void => {
    if (mode === 'json' && stdoutOpen) process.stdout.write(JSON.stringify({ ts: new Date().toISOString(), ...obj }) + '\n');
  };

  const profiles = startProfiles(opened, replay, recordTo, f, log, emit);
  const exportName = String(f['export-name']);
  const server = new NbdServer({ exports: [{ name: exportName, description: `streaming disk of ${redactUrl(url)}`, backend: disk }], log, ...(tls ? { tls } : {}) });
  let uri: string;
  try {
    uri = await server.listen(endpoint);
  } catch (err) {
    profiles.stop();
    await opened.close();
    await hashWorkers?.close();
    throw err;
  }
  const started = Date.now();
  log.info({ uri, size: disk.size, regions: disk.map.count, local: disk.map.local }, 'NBD export listening');
  emit({ event: 'listening', uri, export: exportName, ...disk.progress(), ...profiles.status() });

  const display = startProgress(mode, disk, hydrator, emit, profiles.status);
  hydrator.on('batch-error', (err) => emit({ event: 'error', scope: 'hydration', message: err.message }));
  disk.on('commit-error', (err) => {
    log.error({ err }, 'committing the region map failed');
    emit({ event: 'error', scope: 'commit', message: err.message });
  });
  disk.once('complete', () => {
    emit({ event: 'complete', elapsedMs: Date.now() - started, ...disk.progress(), ...profiles.status() });
  });
  if (!f['no-hydrate']) hydrator.start();

  await new Promise<void>((resolve) => {
    const stop = (sig: string): void => {
      log.info({ signal: sig }, 'stopping: committing state');
      process.off('SIGTERM', onTerm);
      process.off('SIGINT', onInt);
      resolve();
    };
    const onTerm = (): void => stop('SIGTERM');
    const onInt = (): void => stop('SIGINT');
    process.on('SIGTERM', onTerm);
    process.on('SIGINT', onInt);
  });
  display.stop();
  await server.close();
  profiles.stop();
  await opened.close();
  await hashWorkers?.close();
  emit({ event: 'stopped', ...disk.progress(), ...profiles.status() });
  log.info('stopped');
  return 0;
}

function startProgress(mode: string, disk: OpenedDisk['disk'], hydrator: OpenedDisk['hydrator'], emit: (o: Record<string, unknown>) => void, extra: () => Record<string, unknown>): { stop(): void } {
  if (mode === 'none') return { stop() {} };
  let lastBytes = disk.progress().bytesFetched;
  let lastAt = Date.now();
  const tick = (): void => {
    const p = disk.progress();
    const now = Date.now();
    const rate = ((p.bytesFetched - lastBytes) * 1000) / Math.max(1, now - lastAt);
    lastBytes = p.bytesFetched;
    lastAt = now;
    if (mode === 'json') {
      emit({ event: 'progress', hydrator: hydrator.state, fetchRateBps: Math.round(rate), ...p, ...extra() });
      return;
    }
    const frac = p.regionsLocal / p.regionsTotal;
    const width = 30;
    const filled = Math.round(frac * width);
    const bar = '#'.repeat(filled) + '.'.repeat(width - filled);
    const line = `[${bar}] ${(frac * 100).toFixed(1).padStart(5)}%  ${p.regionsLocal}/${p.regionsTotal} regions  fetched ${formatBytes(p.bytesFetched)}  ${formatBytes(rate)}/s  ${hydrator.state}`;
    process.stderr.write(`\r${line}\x1b[K`);
  };
  const timer = setInterval(tick, mode === 'json' ? 1000 : 250);
  timer.unref();
  return {
    stop() {
      clearInterval(timer);
      tick();
      if (mode === 'bar') process.stderr.write('\n');
    },
  };
}

/**
 * --boot-profile: the file read and checked before the disk is opened, so a profile the
 * daemon would refuse with 400 (malformed, another region size) leaves nothing behind.
 * Whether its regions lie in the image is known once the disk is open (applyReplay).
 */
function replayFromFlag(file: string, stateDir: string, regionSize: number | undefined): ReplayProfile {
  const p = readReplayProfile(file, '--boot-profile');
  const problem = replayProblem(p, plannedRegionSize(stateDir, regionSize), null);
  if (problem) throw problem;
  return p;
}

/** --record-profile's file (its directory must exist: it is written when the recording ends), or null. */
function recordTarget(f: FlagValues, argv: string[]): string | null {
  if (!f['record-profile']) {
    const stray = ['--profile-window', '--profile-max-regions'].find((flag) => argv.some((a) => a === flag || a.startsWith(`${flag}=`)));
    if (stray) throw new DpuError('DPU_ERR_CONFIG', `${stray} needs --record-profile: it bounds the recording`);
    return null;
  }
  const file = String(f['record-profile']);
  try {
    fs.accessSync(path.dirname(path.resolve(file)), fs.constants.W_OK);
  } catch (err) {
    throw new DpuError('DPU_ERR_CONFIG', `--record-profile ${file}: cannot write in its directory (${(err as Error).message})`);
  }
  return file;
}

interface Profiles {
  /** `{bootProfile}` for the events while a flag asked for a profile; `{}` otherwise. */
  status(): { bootProfile?: BootProfileStatus };
  /** The agent stops: writes a finished recording not yet written; drops an unfinished one. */
  stop(): void;
}

/**
 * Boot profiles of the disk just opened, before the export listens (so before any host
 * read) and before hydration starts: the replay is queued first in the hydrator (or refused
 * whole, and said why), and the recorder attached.
 */
function startProfiles(opened: OpenedDisk, replayProfile: ReplayProfile | null, recordTo: string | null, f: FlagValues, log: Logger, emit: (o: Record<string, unknown>) => void): Profiles {
  const { disk, hydrator } = opened;
  const replay: ReplayStatus = replayProfile ? applyReplay(replayProfile, disk, hydrator, log) : { state: 'none', regions: [], count: 0, error: null };
  let recorder: BootRecorder | null = null;
  let recorded: RecordedProfile | null = null;
  let unwritten: RecordedProfile | null = null;
  let idle: 'off' | 'waiting' | 'interrupted' = recordTo ? 'waiting' : 'off';
  const write = (): void => {
    const profile = unwritten;
    if (!profile || !recordTo) return;
    unwritten = null;
    try {
      writeJsonAtomic(recordTo, profile);
    } catch (err) {
      log.error({ err: (err as Error).message, file: recordTo }, 'cannot write the recorded boot profile');
      emit({ event: 'error', scope: 'boot-profile', message: `--record-profile ${recordTo}: ${(err as Error).message}` });
      return;
    }
    log.info({ file: recordTo, regions: profile.regions.length, stop: profile.stop_reason }, 'boot profile recorded');
    emit({ event: 'profile-recorded', file: recordTo, regions: profile.regions.length, stopReason: profile.stop_reason, startedAt: profile.started_at, endedAt: profile.ended_at });
  };
  if (recordTo) {
    recorder = recordBoot(disk, { windowMs: f['profile-window'] as number, maxRegions: f['profile-max-regions'] as number }, (profile) => {
      recorded = unwritten = profile;
      recorder = null;
      // Not on the read that ended the recording: the file is written on a later turn.
      setImmediate(write);
    });
  }
  const shown = replayProfile !== null || recordTo !== null;
  return {
    status: () => (shown ? { bootProfile: bootProfileStatus(recorder, recorded, idle, replay, disk.map, replayProfile?.boots ?? null) } : {}),
    stop: () => {
      if (recorder) {
        recorder.detach();
        log.warn({ file: recordTo, state: recorder.state, regions: recorder.regionCount }, 'the boot profile recording had not finished: not written (a partial boot would teach a wrong order)');
        recorder = null;
        idle = 'interrupted';
      }
      write();
    },
  };
}

/**
 * `dpu-agent stream`: serves one streaming disk in the foreground. Progress goes to stderr
 * as a bar on a terminal, or to stdout as JSON lines otherwise (one object per line with
 * an "event" field: listening, progress, complete, stopped, error).
 */
import { pino, type Logger } from 'pino';
import fs from 'node:fs';
import { DpuError } from '../../../image-access/src/errors.js';
import { Manifest } from '../../../image-access/src/manifest.js';
import { NbdServer, parseEndpoint } from '../nbd/server.js';
import { loadNbdTls, type NbdTls, type TlsMode } from '../nbd/tls.js';
import { ConfigError } from '../../../common/src/config.js';
import { redactHeaders, redactUrl } from '../../../image-access/src/redact.js';
import { DEFAULT_REGION_SIZE, IMAGE_FORMATS, type ImageFormat, openStreamingDisk, type OpenedDisk } from '../streaming/open.js';
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
  'request-time': { kind: 'duration', arg: 'TIME', default: '2ms', min: 0, help: 'Link time one background HTTP request carries at most (sized from the measured rate, 64K to 8M), so a host miss waits behind little; 0 sends each fetch as one request.' },
  'hydrate-connections': { kind: 'int', arg: 'N', default: '2', min: 1, help: 'Background range requests in flight.' },
  'max-connections': { kind: 'int', arg: 'N', default: '8', min: 2, help: 'HTTP connections to the origin at most; the ones beyond --hydrate-connections are kept for host reads.' },
  'retry-deadline': { kind: 'duration', arg: 'TIME', default: '30s', min: 1, help: 'A range read fails (EIO to the host) when no byte arrived for this long across retries.' },
  'stall-timeout': { kind: 'duration', arg: 'TIME', default: '10s', min: 1, help: 'An attempt is abandoned and retried when the body stops flowing this long.' },
  'commit-interval': { kind: 'duration', arg: 'TIME', default: '1s', min: 10, help: 'Commit the region map at least this often while it changes (FLUSH and FUA always commit).' },
  manifest: { kind: 'string', arg: 'FILE', help: 'A manifest from "dpu-agent manifest": every fetched region is verified against it (a mismatch is fetched again, never served) and its zero regions are not fetched.' },
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
  log.info({ source: redactUrl(url), format, headers: redactHeaders(headers), target: f['target'], state: f['state'] }, 'opening streaming disk');

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
    stateDir: String(f['state']),
    regionSize: argv.some((a) => a.startsWith('--region-size')) ? (f['region-size'] as number) : undefined,
    hydrator: {
      bandwidth: f['bandwidth'] as number,
      batchBytes: f['batch-size'] as number,
      concurrency: f['hydrate-connections'] as number,
    },
    commitIntervalMs: f['commit-interval'] as number,
    ...(f['manifest'] ? { manifest: readManifest(String(f['manifest'])) } : {}),
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

  const exportName = String(f['export-name']);
  const server = new NbdServer({ exports: [{ name: exportName, description: `streaming disk of ${redactUrl(url)}`, backend: disk }], log, ...(tls ? { tls } : {}) });
  let uri: string;
  try {
    uri = await server.listen(endpoint);
  } catch (err) {
    await opened.close();
    throw err;
  }
  const started = Date.now();
  log.info({ uri, size: disk.size, regions: disk.map.count, local: disk.map.local }, 'NBD export listening');
  emit({ event: 'listening', uri, export: exportName, ...disk.progress() });

  const display = startProgress(mode, disk, hydrator, emit);
  hydrator.on('batch-error', (err) => emit({ event: 'error', scope: 'hydration', message: err.message }));
  disk.on('commit-error', (err) => {
    log.error({ err }, 'committing the region map failed');
    emit({ event: 'error', scope: 'commit', message: err.message });
  });
  disk.once('complete', () => {
    emit({ event: 'complete', elapsedMs: Date.now() - started, ...disk.progress() });
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
  await opened.close();
  emit({ event: 'stopped', ...disk.progress() });
  log.info('stopped');
  return 0;
}

function startProgress(mode: string, disk: OpenedDisk['disk'], hydrator: OpenedDisk['hydrator'], emit: (o: Record<string, unknown>) => void): { stop(): void } {
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
      emit({ event: 'progress', hydrator: hydrator.state, fetchRateBps: Math.round(rate), ...p });
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

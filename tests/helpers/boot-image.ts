// Test helpers: build the bootable fixture disk (tests/fixtures/make-boot-image.sh)
// and boot QEMU from an NBD export of it, timing how long the guest takes to
// print its marker on the serial console.
//
// The guest is a Debian kernel + busybox initramfs whose /init prints
// SMARTNIC-BOOT-OK, then "SMARTNIC-NVME-SIZE ..." and "SMARTNIC-NVME-TAIL-SHA256 ..."
// and powers off, so with -no-reboot QEMU exits by itself after the marker.

import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { performance } from 'node:perf_hooks';

export const BOOT_MARKER = 'SMARTNIC-BOOT-OK';

const MiB = 1 << 20;

/**
 * Bytes of a boot image of `sizeMiB` that its guest never reads: the middle of partition 2
 * (random data), kept 9 MiB — more than one background batch (8 MiB by default) — from
 * the FAT partition it boots from (1–25 MiB) and from the last MiB, which it hashes. An
 * origin that holds them back (TestOrigin.hold) keeps hydration from finishing, however
 * fast or slow the machine, while the guest boots undisturbed: so "the host booted before
 * the copy ended" is a fact of the setup, not a race against the clock.
 */
export function unreadRange(sizeMiB: number): { from: number; to: number } {
  const from = (25 + 9) * MiB;
  const to = (sizeMiB - 1 - 9) * MiB;
  if (to <= from) throw new Error(`a ${sizeMiB} MiB boot image has no range its guest never reads, far enough from what it reads (at least 45 MiB needed)`);
  return { from, to };
}

// The script is not copied by tsc, so look for it both next to the sources
// (running .ts directly) and from dist/tests/helpers/ back to tests/fixtures/.
function scriptPath(): string {
  const candidates = [
    new URL('../fixtures/make-boot-image.sh', import.meta.url),
    new URL('../../../tests/fixtures/make-boot-image.sh', import.meta.url),
  ].map((u) => fileURLToPath(u));
  const found = candidates.find((p) => existsSync(p));
  if (!found) throw new Error(`make-boot-image.sh not found (looked in ${candidates.join(', ')})`);
  return found;
}

export async function buildBootImage(outPath: string, opts: { sizeMiB?: number } = {}): Promise<void> {
  const args = [scriptPath(), outPath];
  if (opts.sizeMiB !== undefined) args.push('--size-mib', String(opts.sizeMiB));
  await new Promise<void>((resolve, reject) => {
    const child = spawn('bash', args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', () => undefined);
    child.stderr.setEncoding('utf8').on('data', (d: string) => { stderr += d; });
    child.on('error', reject);
    child.on('close', (code, signal) => {
      if (code === 0) resolve();
      else reject(new Error(`make-boot-image.sh failed (${signal ?? `exit ${code}`}):\n${stderr.trim()}`));
    });
  });
}

/**
 * Translate an NBD URI into QEMU's legacy -drive file= syntax:
 *   nbd+unix:///[export]?socket=PATH -> nbd:unix:PATH[:exportname=export]
 *   nbd://HOST[:PORT]/[export]       -> nbd:HOST:PORT[:exportname=export]
 * Strings already in "nbd:..." form pass through unchanged.
 */
export function nbdUriToQemu(uri: string): string {
  if (/^nbd:(?!\/\/)/.test(uri)) return uri;
  let u: URL;
  try {
    u = new URL(uri);
  } catch {
    throw new Error(`not an NBD URI: ${uri}`);
  }
  const exportName = decodeURIComponent(u.pathname.replace(/^\//, ''));
  const suffix = exportName ? `:exportname=${exportName}` : '';
  if (u.protocol === 'nbd+unix:') {
    const socket = u.searchParams.get('socket');
    if (!socket) throw new Error(`nbd+unix URI without ?socket=: ${uri}`);
    // The legacy syntax splits on ':', so a socket path containing one cannot be expressed.
    if (socket.includes(':')) throw new Error(`socket path must not contain ':' for QEMU: ${socket}`);
    return `nbd:unix:${socket}${suffix}`;
  }
  if (u.protocol === 'nbd:') {
    if (!u.hostname) throw new Error(`nbd URI without host: ${uri}`);
    return `nbd:${u.hostname}:${u.port || '10809'}${suffix}`;
  }
  throw new Error(`unsupported NBD URI scheme ${u.protocol} (TLS schemes need QEMU tls-creds): ${uri}`);
}

export interface BootResult {
  /** Milliseconds from spawning QEMU to the marker appearing on the serial console. */
  markerSeenMs: number;
  /** QEMU's exit code; null if it had to be killed. */
  exitCode: number | null;
  /** Everything the guest wrote to the serial console. */
  serial: string;
}

export interface BootOptions {
  marker?: string;
  /** Deadline for the marker, from spawn (default 120 s: TCG is slow). */
  timeoutMs?: number;
  memoryMiB?: number;
  /** Called once when the marker is seen, while QEMU may still be running. */
  onMarker?: () => void | Promise<void>;
  /** Receives each serial line (and QEMU stderr lines prefixed "qemu: "). */
  log?: (line: string) => void;
  /** How long to wait after the marker for the guest's poweroff (default 20 s). */
  exitGraceMs?: number;
}

// QEMU processes still alive; killed if the test process exits abruptly so
// a failed or interrupted run never leaves an orphan emulator behind.
const live = new Set<number>();
let exitHookInstalled = false;
function track(pid: number): void {
  live.add(pid);
  if (!exitHookInstalled) {
    exitHookInstalled = true;
    process.on('exit', () => {
      for (const p of live) {
        try { process.kill(p, 'SIGKILL'); } catch { /* already gone */ }
      }
    });
  }
}

const SERIAL_CAP = 1 << 20;
const TAIL_BYTES = 2048;

export async function bootFromNbd(nbdUri: string, opts: BootOptions = {}): Promise<BootResult> {
  const marker = opts.marker ?? BOOT_MARKER;
  const timeoutMs = opts.timeoutMs ?? 120_000;
  const exitGraceMs = opts.exitGraceMs ?? 20_000;
  const log = opts.log;
  // -drive option values escape ',' by doubling it.
  const file = nbdUriToQemu(nbdUri).replace(/,/g, ',,');
  const args = [
    '-machine', 'q35',
    '-m', String(opts.memoryMiB ?? 512),
    '-nographic', '-nodefaults',
    '-serial', 'stdio',
    '-monitor', 'none',
    '-no-reboot',
    '-drive', `file=${file},if=none,id=d0,format=raw`,
    '-device', 'nvme,drive=d0,serial=smartnic0',
    '-boot', 'c',
  ];

  const t0 = performance.now();
  const child: ChildProcess = spawn('qemu-system-x86_64', args, { stdio: ['ignore', 'pipe', 'pipe'] });
  if (child.pid !== undefined) track(child.pid);

  return await new Promise<BootResult>((resolve, reject) => {
    let serial = '';
    let stderr = '';
    let lineBuf = '';
    let markerSeenMs: number | undefined;
    let markerCallback: Promise<void> | undefined;
    let exited = false;
    let settled = false;
    let killedByUs = false;
    let timer: NodeJS.Timeout | undefined;

    const kill = (): void => {
      if (exited || child.pid === undefined) return;
      killedByUs = true;
      try { process.kill(child.pid, 'SIGKILL'); } catch { /* raced with exit */ }
    };
    const tail = (): string => serial.slice(-TAIL_BYTES);
    const fail = (msg: string): void => {
      if (settled) return;
      settled = true;
      if (timer) clearTimeout(timer);
      kill();
      const err = stderr.trim() ? `\n--- qemu stderr ---\n${stderr.trim().slice(-TAIL_BYTES)}` : '';
      // Reject only once QEMU is really gone, so callers can tear down the
      // NBD server right after without QEMU still holding a connection.
      const done = (): void => reject(new Error(`${msg}\n--- last serial output ---\n${tail()}${err}`));
      if (exited) done(); else child.once('close', done);
    };

    const emitLines = (chunk: string, flush: boolean): void => {
      if (!log) return;
      lineBuf += chunk;
      const parts = lineBuf.split('\n');
      lineBuf = flush ? '' : (parts.pop() ?? '');
      for (const p of parts) log(p.replace(/\r$/, ''));
    };

    timer = setTimeout(() => {
      fail(`QEMU boot timed out after ${timeoutMs} ms without marker ${JSON.stringify(marker)}`);
    }, timeoutMs);

    child.stdout!.setEncoding('utf8').on('data', (d: string) => {
      // Search the join region too: the marker can straddle two chunks.
      const from = Math.max(0, serial.length - marker.length);
      serial += d;
      if (serial.length > SERIAL_CAP) serial = serial.slice(-SERIAL_CAP);
      emitLines(d, false);
      if (markerSeenMs === undefined && serial.indexOf(marker, Math.min(from, serial.length)) !== -1) {
        markerSeenMs = performance.now() - t0;
        clearTimeout(timer);
        // After the marker the guest powers off by itself; bound that wait.
        timer = setTimeout(kill, exitGraceMs);
        markerCallback = (async () => { await opts.onMarker?.(); })();
        markerCallback.catch((e: unknown) => fail(`onMarker failed: ${e instanceof Error ? e.message : String(e)}`));
      }
    });
    child.stderr!.setEncoding('utf8').on('data', (d: string) => {
      stderr += d;
      if (stderr.length > SERIAL_CAP) stderr = stderr.slice(-SERIAL_CAP);
      if (log) for (const l of d.split('\n')) if (l.trim()) log(`qemu: ${l}`);
    });

    child.on('error', (e) => {
      exited = true;
      if (child.pid !== undefined) live.delete(child.pid);
      fail(`failed to start qemu-system-x86_64: ${e.message}`);
    });
    // 'close' (not 'exit') so all serial output has been read.
    child.on('close', (code, signal) => {
      exited = true;
      if (child.pid !== undefined) live.delete(child.pid);
      emitLines('', true);
      if (settled) return;
      if (markerSeenMs === undefined) {
        fail(`QEMU exited (${signal ?? `code ${code}`}) before marker ${JSON.stringify(marker)}`);
        return;
      }
      if (timer) clearTimeout(timer);
      const seen = markerSeenMs;
      const exitCode = killedByUs ? null : code;
      void markerCallback!.then(() => {
        if (settled) return;
        settled = true;
        resolve({ markerSeenMs: seen, exitCode, serial });
      }, () => undefined /* handled by the catch above */);
    });
  });
}

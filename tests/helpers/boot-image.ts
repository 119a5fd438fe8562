// Test helpers: build the bootable fixture disks and boot QEMU from an NBD export of
// one, timing how long the guest takes to print its marker on the serial console.
//
// Two fixtures:
//   - tests/fixtures/make-boot-image.sh (buildBootImage): a Debian kernel + busybox
//     initramfs whose /init prints SMARTNIC-BOOT-OK, then "SMARTNIC-NVME-SIZE ..." and
//     "SMARTNIC-NVME-TAIL-SHA256 ..." and powers off, so with -no-reboot QEMU exits by
//     itself after the marker. SeaBIOS, seconds to boot.
//   - tests/fixtures/make-debian-image.sh (buildDebianImage): a real Debian 12 cloud image
//     (GPT, GRUB, systemd, cloud-init) for UEFI (OVMF) or BIOS (SeaBIOS). It boots to a
//     serial login prompt (LOGIN_PROMPT) in about a minute under TCG and keeps running:
//     boot it with `afterMarker: 'stop'`.

import { spawn, type ChildProcess } from 'node:child_process';
import { copyFileSync, existsSync, mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { performance } from 'node:perf_hooks';

export const BOOT_MARKER = 'SMARTNIC-BOOT-OK';

/**
 * The serial getty's prompt ("debian login: "): a real OS has reached multi-user. Anchored
 * at a line start, so no boot message that merely contains "login:" matches.
 */
export const LOGIN_PROMPT = /^[\w.-]+ login: /m;

/** The Debian image's root file system UUID (fixed by make-debian-image.sh). */
export const DEBIAN_ROOT_UUID = '5a3c6e1f-0d2b-4c8e-9f17-53d4e0c2a001';

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

// The scripts are not copied by tsc, so look for them both next to the sources
// (running .ts directly) and from dist/tests/helpers/ back to tests/fixtures/.
function scriptPath(name: string): string {
  const candidates = [
    new URL(`../fixtures/${name}`, import.meta.url),
    new URL(`../../../tests/fixtures/${name}`, import.meta.url),
  ].map((u) => fileURLToPath(u));
  const found = candidates.find((p) => existsSync(p));
  if (!found) throw new Error(`${name} not found (looked in ${candidates.join(', ')})`);
  return found;
}

/** Runs a fixture script; its stderr (progress, and the reason on failure) goes to `log` line by line. */
function runFixture(name: string, args: string[], log?: (line: string) => void): Promise<void> {
  return new Promise<void>((resolve, reject) => {
    const child = spawn('bash', [scriptPath(name), ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    let stderr = '';
    /** Where the next line to hand to `log` starts in `stderr`. */
    let logged = 0;
    const emit = (all: boolean): void => {
      if (!log) return;
      const end = all ? stderr.length : stderr.lastIndexOf('\n') + 1;
      if (end <= logged) return;
      for (const l of stderr.slice(logged, end).split('\n')) if (l.trim()) log(l);
      logged = end;
    };
    child.stdout.setEncoding('utf8').on('data', () => undefined);
    child.stderr.setEncoding('utf8').on('data', (d: string) => {
      stderr += d;
      emit(false);
    });
    child.on('error', reject);
    child.on('close', (code, signal) => {
      emit(true);
      if (code === 0) resolve();
      else reject(new Error(`${name} failed (${signal ?? `exit ${code}`}):\n${stderr.trim()}`));
    });
  });
}

export async function buildBootImage(outPath: string, opts: { sizeMiB?: number } = {}): Promise<void> {
  const args = [outPath];
  if (opts.sizeMiB !== undefined) args.push('--size-mib', String(opts.sizeMiB));
  await runFixture('make-boot-image.sh', args);
}

export interface DebianImageOptions {
  /** How the image boots: GRUB on an ESP (UEFI, OVMF) or GRUB i386-pc (BIOS, SeaBIOS). @default 'uefi' */
  boot?: 'uefi' | 'bios';
  /** The whole image's size; by default the root file system's content plus ~25% free. */
  sizeMiB?: number;
  /** Receives the script's progress lines (the first build runs mmdebstrap for minutes). */
  log?: (line: string) => void;
}

/**
 * Writes a Debian 12 cloud image to `outPath` (tests/fixtures/make-debian-image.sh: needs
 * root, and the mirror the first time; later calls copy the cached image in seconds).
 */
export async function buildDebianImage(outPath: string, opts: DebianImageOptions = {}): Promise<void> {
  const args = [outPath, '--boot', opts.boot ?? 'uefi'];
  if (opts.sizeMiB !== undefined) args.push('--size-mib', String(opts.sizeMiB));
  await runFixture('make-debian-image.sh', args, opts.log);
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
  /** QEMU's exit code; null if it was stopped (afterMarker 'stop') or had to be killed. */
  exitCode: number | null;
  /** Everything the guest wrote to the serial console. */
  serial: string;
}

/** The host's firmware: SeaBIOS (QEMU's default) or OVMF (UEFI, Debian package ovmf). */
export type Firmware = 'seabios' | 'ovmf';

export interface BootOptions {
  /** What to wait for on the serial console: text, or a pattern such as LOGIN_PROMPT. @default BOOT_MARKER */
  marker?: string | RegExp;
  /** Deadline for the marker, from spawn (default 120 s: TCG is slow). */
  timeoutMs?: number;
  memoryMiB?: number;
  /** @default 'seabios' */
  firmware?: Firmware;
  /** The NVMe controller's serial number, as the guest sees it (up to 20 printable characters, no comma). @default 'smartnic0' */
  nvmeSerial?: string;
  /**
   * Give the guest a virtio NIC on QEMU's user-mode network (its built-in DHCP server, no
   * host-side setup), so a real OS's DHCP client gets an address. @default false
   */
  network?: boolean;
  /** Called once when the marker is seen, while QEMU is still running. */
  onMarker?: () => void | Promise<void>;
  /**
   * After the marker (and onMarker): `wait` for the guest to power off by itself (the
   * busybox fixture does), or `stop` QEMU (SIGTERM) — a real OS at its login prompt keeps
   * running. @default 'wait'
   */
  afterMarker?: 'wait' | 'stop';
  /** Receives each serial line (and QEMU stderr lines prefixed "qemu: "). */
  log?: (line: string) => void;
  /** How long to wait after the marker for the guest's poweroff, or after `stop` for QEMU to exit, before SIGKILL (default 20 s). */
  exitGraceMs?: number;
}

// QEMU processes still alive, and their scratch directories (OVMF variable stores):
// killed and removed if the test process exits abruptly, so a failed or interrupted run
// never leaves an orphan emulator behind.
const live = new Set<number>();
const scratch = new Set<string>();
let exitHookInstalled = false;
function installExitHook(): void {
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  process.on('exit', () => {
    for (const p of live) {
      try { process.kill(p, 'SIGKILL'); } catch { /* already gone */ }
    }
    for (const d of scratch) rmSync(d, { recursive: true, force: true });
  });
}
function track(pid: number): void {
  installExitHook();
  live.add(pid);
}

const SERIAL_CAP = 1 << 20;
const TAIL_BYTES = 2048;
/** How far back a pattern marker is searched again when more output arrives (it may straddle chunks). */
const PATTERN_OVERLAP = 512;

export const OVMF_CODE = '/usr/share/OVMF/OVMF_CODE_4M.fd';
export const OVMF_VARS = '/usr/share/OVMF/OVMF_VARS_4M.fd';

/**
 * QEMU arguments for the firmware. OVMF's variable store is writable (boot entries,
 * settings), so each boot gets a fresh copy in `dir`; OVMF_CODE_4M.fd is the build
 * without Secure Boot enforcement, which the test images (unsigned GRUB) need.
 */
export function firmwareArgs(firmware: Firmware, dir: () => string): string[] {
  if (firmware === 'seabios') return [];
  for (const f of [OVMF_CODE, OVMF_VARS]) {
    if (!existsSync(f)) throw new Error(`UEFI firmware not found: ${f} (install Debian package: ovmf)`);
  }
  // A machine's NVRAM: made once per directory, kept across its power cycles.
  const vars = path.join(dir(), 'OVMF_VARS.fd');
  if (!existsSync(vars)) copyFileSync(OVMF_VARS, vars);
  return [
    '-drive', `if=pflash,format=raw,readonly=on,file=${OVMF_CODE.replace(/,/g, ',,')}`,
    '-drive', `if=pflash,format=raw,file=${vars.replace(/,/g, ',,')}`,
  ];
}

export async function bootFromNbd(nbdUri: string, opts: BootOptions = {}): Promise<BootResult> {
  // A pattern is tested repeatedly: without the g/y flags, so no lastIndex carries over.
  const marker = opts.marker instanceof RegExp ? new RegExp(opts.marker.source, opts.marker.flags.replace(/[gy]/g, '')) : (opts.marker ?? BOOT_MARKER);
  const markerText = typeof marker === 'string' ? JSON.stringify(marker) : String(marker);
  const timeoutMs = opts.timeoutMs ?? 120_000;
  const exitGraceMs = opts.exitGraceMs ?? 20_000;
  const afterMarker = opts.afterMarker ?? 'wait';
  const nvmeSerial = opts.nvmeSerial ?? 'smartnic0';
  if (!/^[\x21-\x2b\x2d-\x7e]{1,20}$/.test(nvmeSerial)) throw new Error(`nvmeSerial must be 1-20 printable characters without spaces or commas: ${JSON.stringify(nvmeSerial)}`);
  const log = opts.log;
  // -drive option values escape ',' by doubling it.
  const file = nbdUriToQemu(nbdUri).replace(/,/g, ',,');

  let scratchDir: string | undefined;
  const dir = (): string => {
    if (!scratchDir) {
      installExitHook();
      scratchDir = mkdtempSync(path.join(os.tmpdir(), 'smartnic-qemu-'));
      scratch.add(scratchDir);
    }
    return scratchDir;
  };
  const removeScratch = (): void => {
    if (!scratchDir) return;
    rmSync(scratchDir, { recursive: true, force: true });
    scratch.delete(scratchDir);
  };
  let args: string[];
  try {
    args = [
      '-machine', 'q35',
      '-m', String(opts.memoryMiB ?? 512),
      '-nographic', '-nodefaults',
      '-serial', 'stdio',
      '-monitor', 'none',
      // A guest that reboots (a panic, a failed boot) ends QEMU instead of looping.
      '-no-reboot',
      ...firmwareArgs(opts.firmware ?? 'seabios', dir),
      '-drive', `file=${file},if=none,id=d0,format=raw`,
      // bootindex: the firmware boots the disk first, not the NIC (PXE would cost minutes under TCG).
      '-device', `nvme,drive=d0,serial=${nvmeSerial},bootindex=0`,
      // romfile= (empty): no iPXE option ROM; the guest OS drives the NIC itself.
      ...(opts.network ? ['-netdev', 'user,id=n0', '-device', 'virtio-net-pci,netdev=n0,romfile='] : []),
      '-boot', 'c',
    ];
  } catch (e) {
    removeScratch();
    throw e;
  }

  const t0 = performance.now();
  const child: ChildProcess = spawn('qemu-system-x86_64', args, { stdio: ['ignore', 'pipe', 'pipe'] });
  if (child.pid !== undefined) track(child.pid);

  return await new Promise<BootResult>((resolve, reject) => {
    let serial = '';
    /** How much of `serial` a pattern marker has been searched in. */
    let scanned = 0;
    let stderr = '';
    let lineBuf = '';
    let markerSeenMs: number | undefined;
    let markerCallback: Promise<void> | undefined;
    let exited = false;
    let settled = false;
    let stoppedByUs = false;
    let timer: NodeJS.Timeout | undefined;

    const signal = (sig: NodeJS.Signals): void => {
      if (exited || child.pid === undefined) return;
      stoppedByUs = true;
      try { process.kill(child.pid, sig); } catch { /* raced with exit */ }
    };
    const kill = (): void => signal('SIGKILL');
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

    /** Whether the marker is in `serial`, given that `added` characters just arrived. */
    const markerIn = (added: number): boolean => {
      if (typeof marker === 'string') {
        // Search the join region too: the marker can straddle two chunks.
        const from = Math.max(0, serial.length - added - marker.length);
        return serial.indexOf(marker, from) !== -1;
      }
      // Patterns are searched again from the start of the line before the join, so that
      // one anchored at a line start (LOGIN_PROMPT) sees whole lines.
      const from = serial.lastIndexOf('\n', Math.max(0, Math.min(scanned, serial.length - added) - PATTERN_OVERLAP)) + 1;
      scanned = serial.length;
      return marker.test(serial.slice(from));
    };

    timer = setTimeout(() => {
      fail(`QEMU boot timed out after ${timeoutMs} ms without marker ${markerText}`);
    }, timeoutMs);

    child.stdout!.setEncoding('utf8').on('data', (d: string) => {
      serial += d;
      if (serial.length > SERIAL_CAP) {
        scanned = Math.max(0, scanned - (serial.length - SERIAL_CAP));
        serial = serial.slice(-SERIAL_CAP);
      }
      emitLines(d, false);
      if (markerSeenMs === undefined && markerIn(d.length)) {
        markerSeenMs = performance.now() - t0;
        clearTimeout(timer);
        // After the marker the busybox guest powers off by itself; bound that wait.
        if (afterMarker === 'wait') timer = setTimeout(kill, exitGraceMs);
        markerCallback = (async () => { await opts.onMarker?.(); })();
        markerCallback.then(
          () => {
            if (afterMarker !== 'stop' || settled) return;
            signal('SIGTERM');
            timer = setTimeout(kill, exitGraceMs);
          },
          (e: unknown) => fail(`onMarker failed: ${e instanceof Error ? e.message : String(e)}`),
        );
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
      removeScratch();
      fail(`failed to start qemu-system-x86_64: ${e.message}`);
    });
    // 'close' (not 'exit') so all serial output has been read.
    child.on('close', (code, sig) => {
      exited = true;
      if (child.pid !== undefined) live.delete(child.pid);
      removeScratch();
      emitLines('', true);
      if (settled) return;
      if (markerSeenMs === undefined) {
        fail(`QEMU exited (${sig ?? `code ${code}`}) before marker ${markerText}`);
        return;
      }
      if (timer) clearTimeout(timer);
      const seen = markerSeenMs;
      const exitCode = stoppedByUs ? null : code;
      void markerCallback!.then(() => {
        if (settled) return;
        settled = true;
        resolve({ markerSeenMs: seen, exitCode, serial });
      }, () => undefined /* handled by the catch above */);
    });
  });
}

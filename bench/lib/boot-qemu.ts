/**
 * The bare-metal host of the deploy benches: QEMU (TCG) booting from an NBD export as an
 * NVMe disk, with the serial console watched for the fixture's boot marker. Unlike
 * tests/helpers/boot-image.ts's bootFromNbd, the emulator is a tracked child of the bench
 * (bench/lib/common.ts), so it is stopped by PID however the bench ends, and the caller
 * decides when it stops: right at the marker for a timing run, or after an I/O run against
 * the same export while the host is still up.
 */
import type { ChildProcess } from 'node:child_process';
import { performance } from 'node:perf_hooks';
import { BOOT_MARKER } from '../../tests/helpers/boot-image.js';
import { spawnTracked, stopChild } from './common.js';

export interface QemuHost {
  readonly child: ChildProcess;
  /** performance.now() when QEMU was spawned. */
  readonly startedAt: number;
  /** Resolves with performance.now() when the marker appears; rejects on exit or timeout. */
  readonly marker: Promise<number>;
  /** The serial console so far (last 256 KiB). */
  serial(): string;
  /** Stops QEMU by PID (SIGTERM, then SIGKILL after 2 s) and waits for it. */
  stop(): Promise<void>;
}

export interface QemuHostOptions {
  /** Deadline for the marker, from spawn (default 180 s). */
  timeoutMs?: number;
  memoryMiB?: number;
  marker?: string;
}

const SERIAL_CAP = 256 * 1024;

/** `socket`: the unix socket of the export (the empty export name). */
export function startQemuHost(socket: string, opts: QemuHostOptions = {}): QemuHost {
  if (socket.includes(':') || socket.includes(',')) throw new Error(`QEMU's legacy nbd: syntax cannot express the socket path ${socket}`);
  const markerText = opts.marker ?? BOOT_MARKER;
  const args = [
    '-machine', 'q35', '-m', String(opts.memoryMiB ?? 512),
    '-nographic', '-nodefaults', '-serial', 'stdio', '-monitor', 'none',
    // The fixture powers off after its marker and tail check; without -no-reboot QEMU
    // would boot it again.
    '-no-reboot',
    '-drive', `file=nbd:unix:${socket},if=none,id=d0,format=raw`,
    '-device', 'nvme,drive=d0,serial=smartnic0',
    '-boot', 'c',
  ];
  const startedAt = performance.now();
  const { child, stderr } = spawnTracked('qemu-system-x86_64', args, { stdio: ['ignore', 'pipe', 'pipe'] });
  let serial = '';
  const marker = new Promise<number>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`QEMU: no ${markerText} within ${(opts.timeoutMs ?? 180_000) / 1000} s; serial:\n${serial.slice(-2000)}`)), opts.timeoutMs ?? 180_000);
    child.stdout!.setEncoding('utf8').on('data', (d: string) => {
      // The marker may straddle two chunks: search from just before the join.
      const from = Math.max(0, serial.length - markerText.length);
      serial += d;
      if (serial.includes(markerText, from)) {
        clearTimeout(timer);
        resolve(performance.now());
      }
      if (serial.length > SERIAL_CAP) serial = serial.slice(-SERIAL_CAP);
    });
    child.once('exit', (code, sig) => {
      clearTimeout(timer);
      reject(new Error(`QEMU exited (${sig ?? code}) before ${markerText}: ${stderr().slice(-2000)}\nserial:\n${serial.slice(-2000)}`));
    });
  });
  // A rejection after the marker (the exit) is expected; callers await `marker` themselves.
  marker.catch(() => undefined);
  return { child, startedAt, marker, serial: () => serial, stop: () => stopChild(child, 2000) };
}

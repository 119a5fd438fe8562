/**
 * The bare-metal host of the deploy benches: QEMU (TCG) booting from an NBD export as an
 * NVMe disk, with the serial console watched for a marker — the busybox fixture's
 * SMARTNIC-BOOT-OK, or a real OS's login prompt (LOGIN_PROMPT). Unlike
 * tests/helpers/boot-image.ts's bootFromNbd, the emulator is a tracked child of the bench
 * (bench/lib/common.ts), so it is stopped by PID however the bench ends, and the caller
 * decides when it stops: right at the marker for a timing run, or after an I/O run against
 * the same export while the host is still up.
 *
 * QEMU also listens on a QMP socket, so the caller can read the boot disk's counters
 * (query-blockstats) at the marker: how many bytes the guest read and wrote, in how many
 * requests — the boot's working set as the host saw it, whatever served the disk.
 */
import type { ChildProcess } from 'node:child_process';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { BOOT_MARKER, firmwareArgs, type Firmware } from '../../tests/helpers/boot-image.js';
import { spawnTracked, stopChild } from './common.js';
import { QmpClient } from './streaming-clients.js';

/** QEMU's counters of the boot disk (query-blockstats of drive d0), from power-on. */
export interface BlockStats {
  readBytes: number;
  readOps: number;
  writeBytes: number;
  writeOps: number;
  flushOps: number;
  /**
   * The guest's read latencies summed over its requests, seconds (rd_total_time_ns): an
   * upper bound on how long the boot waited for its disk (requests in flight together count
   * each), and far less noisy under TCG than the boot's wall time, which follows QEMU's CPU.
   */
  readWaitS: number;
}

export interface QemuHost {
  readonly child: ChildProcess;
  /** performance.now() when QEMU was spawned. */
  readonly startedAt: number;
  /** Resolves with performance.now() when the marker appears; rejects on exit or timeout. */
  readonly marker: Promise<number>;
  /** The serial console so far (last 256 KiB). */
  serial(): string;
  /** The boot disk's counters now (QMP query-blockstats). */
  blockStats(): Promise<BlockStats>;
  /** Stops QEMU by PID (SIGTERM, then SIGKILL after 2 s) and waits for it. */
  stop(): Promise<void>;
}

export interface QemuHostOptions {
  /** Per-boot files: the QMP socket and, under OVMF, the machine's variable store. */
  dir: string;
  /** Deadline for the marker, from spawn (default 180 s). */
  timeoutMs?: number;
  memoryMiB?: number;
  /** Text, or a pattern such as LOGIN_PROMPT (matched against whole lines). @default BOOT_MARKER */
  marker?: string | RegExp;
  /** @default 'seabios' */
  firmware?: Firmware;
  /**
   * A virtio NIC on QEMU's user-mode network (its own DHCP server, nothing on the host), so
   * a real OS brings its network up as on a bare-metal host. @default false
   */
  network?: boolean;
}

const SERIAL_CAP = 256 * 1024;
/** How far back a pattern marker is searched again when more output arrives (it may straddle chunks). */
const PATTERN_OVERLAP = 512;

/** The QEMU arguments of a host booting from `socket` (the unix socket of the export, empty export name). */
export function qemuHostArgs(socket: string, qmpSocket: string, opts: QemuHostOptions): string[] {
  if (socket.includes(':') || socket.includes(',')) throw new Error(`QEMU's legacy nbd: syntax cannot express the socket path ${socket}`);
  const firmware = opts.firmware ?? 'seabios';
  return [
    '-machine', 'q35', '-m', String(opts.memoryMiB ?? 512),
    '-nographic', '-nodefaults', '-serial', 'stdio', '-monitor', 'none',
    // The busybox fixture powers off after its marker and tail check; without -no-reboot
    // QEMU would boot it again. A real OS that fails to boot ends QEMU instead of looping.
    '-no-reboot',
    ...firmwareArgs(firmware, () => opts.dir),
    '-drive', `file=nbd:unix:${socket},if=none,id=d0,format=raw`,
    // Under OVMF, bootindex makes the disk the first boot option (no PXE attempt first,
    // which costs minutes under TCG); SeaBIOS boots it with -boot c alone, as before.
    '-device', `nvme,drive=d0,serial=smartnic0${firmware === 'ovmf' ? ',bootindex=0' : ''}`,
    // romfile= (empty): no iPXE option ROM; the guest OS drives the NIC itself.
    ...(opts.network ? ['-netdev', 'user,id=n0', '-device', 'virtio-net-pci,netdev=n0,romfile='] : []),
    '-boot', 'c',
    '-qmp', `unix:${qmpSocket},server=on,wait=off`,
  ];
}

/** The marker did not appear in time: the guest hung (or is far slower than asked). */
export class MarkerTimeout extends Error {
  constructor(
    readonly markerText: string,
    readonly timeoutMs: number,
    /** The end of the serial console: where the guest stopped. */
    readonly serialTail: string,
  ) {
    super(`QEMU: no ${markerText} within ${timeoutMs / 1000} s; serial:\n${serialTail}`);
  }
}

export function startQemuHost(socket: string, opts: QemuHostOptions): QemuHost {
  const marker = opts.marker ?? BOOT_MARKER;
  // A pattern is tested repeatedly: without the g/y flags, so no lastIndex carries over.
  const pattern = marker instanceof RegExp ? new RegExp(marker.source, marker.flags.replace(/[gy]/g, '')) : null;
  const markerText = typeof marker === 'string' ? marker : String(marker);
  const qmpSocket = path.join(opts.dir, `qmp-${path.basename(socket)}`);
  const args = qemuHostArgs(socket, qmpSocket, opts);
  const timeoutMs = opts.timeoutMs ?? 180_000;
  const startedAt = performance.now();
  const { child, stderr } = spawnTracked('qemu-system-x86_64', args, { stdio: ['ignore', 'pipe', 'pipe'] });
  let serial = '';
  /** How much of `serial` a pattern has been searched in. */
  let scanned = 0;
  const seen = (added: number): boolean => {
    if (!pattern) {
      // The marker may straddle two chunks: search from just before the join.
      return serial.includes(marker as string, Math.max(0, serial.length - added - markerText.length));
    }
    // Searched again from the start of the line before the join, so a pattern anchored at
    // a line start (LOGIN_PROMPT) sees whole lines.
    const from = serial.lastIndexOf('\n', Math.max(0, Math.min(scanned, serial.length - added) - PATTERN_OVERLAP)) + 1;
    scanned = serial.length;
    return pattern.test(serial.slice(from));
  };
  const markerP = new Promise<number>((resolve, reject) => {
    const timer = setTimeout(() => reject(new MarkerTimeout(markerText, timeoutMs, serial.slice(-2000))), timeoutMs);
    let done = false;
    child.stdout!.setEncoding('utf8').on('data', (d: string) => {
      serial += d;
      if (serial.length > SERIAL_CAP) {
        scanned = Math.max(0, scanned - (serial.length - SERIAL_CAP));
        serial = serial.slice(-SERIAL_CAP);
      }
      if (!done && seen(d.length)) {
        done = true;
        clearTimeout(timer);
        resolve(performance.now());
      }
    });
    child.once('exit', (code, sig) => {
      clearTimeout(timer);
      reject(new Error(`QEMU exited (${sig ?? code}) before ${markerText}: ${stderr().slice(-2000)}\nserial:\n${serial.slice(-2000)}`));
    });
  });
  // A rejection after the marker (the exit) is expected; callers await `marker` themselves.
  markerP.catch(() => undefined);
  return {
    child,
    startedAt,
    marker: markerP,
    serial: () => serial,
    blockStats: async () => {
      const qmp = await QmpClient.connect(qmpSocket, 5000);
      try {
        const all = (await qmp.execute('query-blockstats', undefined, 5000)) as { device?: string; stats: Record<string, number> }[];
        const s = all.find((b) => b.device === 'd0')?.stats;
        if (!s) throw new Error(`query-blockstats: no drive d0 in ${JSON.stringify(all).slice(0, 500)}`);
        return { readBytes: s['rd_bytes']!, readOps: s['rd_operations']!, writeBytes: s['wr_bytes']!, writeOps: s['wr_operations']!, flushOps: s['flush_operations']!, readWaitS: (s['rd_total_time_ns'] ?? NaN) / 1e9 };
      } finally {
        qmp.close();
      }
    },
    stop: () => stopChild(child, 2000),
  };
}

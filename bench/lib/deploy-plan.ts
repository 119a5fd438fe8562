/**
 * The pure part of the deploy-modes bench (bench/deploy-modes.ts): which modes exist, the
 * order each round runs them in, link-rate labels, the goals of issue #14 computed from
 * the medians, and what is done with a boot that hangs. Kept apart from the bench's processes so a unit test checks it
 * (tests/unit/deploy-plan.test.ts).
 */

import type { BlockStats } from './boot-qemu.js';

/**
 * Every way the bench gives the host its disk. `streaming-profile` is streaming with a
 * learned boot profile (issue #14 part 3): `dpu-agent stream --boot-profile`, replaying what
 * one earlier streaming boot of the image recorded with `--record-profile`.
 */
export const MODES = ['streaming', 'streaming-profile', 'copy-first', 'network-only', 'local'] as const;
export type Mode = (typeof MODES)[number];

/**
 * The modes of a run without `--modes`. The real OS runs them all: its goals (issue #14)
 * compare streaming with network-only, and streaming with a profile with local. The busybox
 * fixture leaves the profile out: its goals (issue #7) do not need it, and its boot takes
 * seconds while recording a profile waits out the recording's window (minutes) per size and
 * rate. `--modes` adds it.
 */
export function defaultModes(image: 'debian' | 'busybox'): Mode[] {
  return image === 'debian' ? [...MODES] : MODES.filter((m) => m !== 'streaming-profile');
}

/**
 * The modes of round `round` (1-based), rotated by one per round so the slow drifts of a
 * shared machine fall on every mode alike, and no mode always runs right after another.
 */
export function roundOrder<T>(modes: readonly T[], round: number): T[] {
  const n = modes.length;
  return modes.map((_, i) => modes[(i + round - 1) % n]!);
}

/** 125e6 bytes/s → "1 Gbit/s"; 12.5e6 → "100 Mbit/s". */
export function rateLabel(bytesPerSecond: number): string {
  const bits = bytesPerSecond * 8;
  if (bits >= 1e9) return `${+(bits / 1e9).toFixed(2)} Gbit/s`;
  if (bits >= 1e6) return `${+(bits / 1e6).toFixed(2)} Mbit/s`;
  return `${+(bits / 1e3).toFixed(2)} kbit/s`;
}

export interface RatioGoal {
  /** The link, as given on the command line (1gbit, 100mbit). */
  link: string;
  bitsPerSecond: number;
  ratio: number;
  goal: number;
  met: boolean;
}

export interface RealOsGoals {
  /** Issue #14: without a profile, deploy → login prompt by streaming ≤ by network-only. */
  streamingOverNetworkOnly: RatioGoal[];
  /** Issue #14: with a boot profile ≤ 1.05× a local boot; null while the mode has not run. */
  profileOverLocal: RatioGoal[] | null;
}

/** The medians of deploy → login prompt (s) per mode, at one link rate. */
export interface RateMedians {
  link: string;
  bitsPerSecond: number;
  toMarkerS: Partial<Record<Mode, number>>;
}

/** The goals from the medians; a rate where a mode of the ratio did not run is left out. */
export function realOsGoals(rates: RateMedians[]): RealOsGoals {
  const goal = (r: RateMedians, a: Mode, b: Mode, limit: number): RatioGoal[] => {
    const x = r.toMarkerS[a];
    const y = r.toMarkerS[b];
    if (x === undefined || y === undefined || !Number.isFinite(x / y)) return [];
    return [{ link: r.link, bitsPerSecond: r.bitsPerSecond, ratio: x / y, goal: limit, met: x / y <= limit }];
  };
  const profile = rates.flatMap((r) => goal(r, 'streaming-profile', 'local', 1.05));
  return {
    streamingOverNetworkOnly: rates.flatMap((r) => goal(r, 'streaming', 'network-only', 1)),
    profileOverLocal: profile.length ? profile : null,
  };
}

// ------------------------------------------------------------------ hung boots

/**
 * A boot that did not reach its marker: the guest stopped somewhere (seen once in a local
 * boot from nbdkit's file plugin: Linux idle in HLT after 3,162 of the ~3,620 reads, no disk
 * I/O and no console output for minutes). Kept in the results with where it stopped; the
 * boot is run again once (bootAgainIfHung).
 */
export interface HungBoot {
  /** Which boot: a timed round's, the working set's, or the one that records the profile (absent in older results: a round's). */
  run?: BootKind;
  link: string;
  /** The image's size, where the image has several (the busybox fixture's). */
  size?: string;
  mode: Mode;
  rep: number;
  attempt: number;
  timeoutS: number;
  /** QEMU's disk counters when it was given up on. */
  guest: BlockStats | null;
  serialTail: string;
}

export type BootKind = 'round' | 'working set' | 'profile recording';

/** Which boot a hung one was, in words. */
export function hungName(h: HungBoot): string {
  const where = `${h.size ? `${h.size} ` : ''}${h.link}`;
  return !h.run || h.run === 'round' ? `${where} ${h.mode} round ${h.rep}` : `${where} ${h.run}${h.run === 'working set' ? ` ${h.rep}` : ''}`;
}

export class BootHung extends Error {
  constructor(readonly hung: HungBoot) {
    super(`${hungName(hung)}: no marker within ${hung.timeoutS} s`);
  }
}

/**
 * `boot(attempt)`, booted once more if it hangs (each hang is pushed to `hung`, a second
 * one thrown): one guest that stops short of its marker must not lose an hour-long run.
 */
export async function bootAgainIfHung<T>(hung: HungBoot[], log: (s: string) => void, markerName: string, boot: (attempt: number) => Promise<T>): Promise<T> {
  for (let attempt = 1; ; attempt++) {
    try {
      return await boot(attempt);
    } catch (err) {
      if (!(err instanceof BootHung)) throw err;
      hung.push(err.hung);
      if (attempt >= 2) throw err;
      const h = err.hung;
      log(`  ${hungName(h)} HUNG: no ${markerName} within ${h.timeoutS} s (the guest had read ${h.guest ? `${h.guest.readOps} requests` : '?'}); booting it again. Serial tail: ${JSON.stringify(h.serialTail.slice(-300))}`);
      await new Promise((r) => setTimeout(r, 500)); // the pause the bench leaves between any two boots
    }
  }
}

/** Parsers for human-written quantities in flags and config; each error says what is accepted. */
import { DpuError } from '../../../image-access/src/errors.js';

const BINARY: Record<string, number> = { '': 1, k: 2 ** 10, m: 2 ** 20, g: 2 ** 30, t: 2 ** 40 };

/** "1048576", "64k", "1M", "1MiB", "2G" — binary multiples. */
export function parseSize(text: string, what: string): number {
  const m = /^(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?$/i.exec(text.trim());
  if (!m) throw new DpuError('DPU_ERR_CONFIG', `${what} "${text}" is not a size; write e.g. 1048576, 64K, 1M or 2G`);
  const v = Number(m[1]) * BINARY[m[2]!.toLowerCase()]!;
  if (!Number.isSafeInteger(Math.round(v))) throw new DpuError('DPU_ERR_CONFIG', `${what} "${text}" is too large`);
  return Math.round(v);
}

/** Bytes per second: "50M" (MiB/s), "100M/s", "1gbit", "800mbit" (decimal bits). 0 = no cap. */
export function parseRate(text: string, what: string): number {
  const t = text.trim().toLowerCase();
  const bits = /^(\d+(?:\.\d+)?)\s*([kmgt]?)bits?(?:\/s|ps)?$/.exec(t);
  if (bits) return Math.round((Number(bits[1]) * { '': 1, k: 1e3, m: 1e6, g: 1e9, t: 1e12 }[bits[2]!]!) / 8);
  try {
    return parseSize(t.replace(/\/s$/, ''), what);
  } catch {
    throw new DpuError('DPU_ERR_CONFIG', `${what} "${text}" is not a rate; write e.g. 50M (MiB/s), 1gbit or 0 for no cap`);
  }
}

/** "500ms", "30s", "2m", or plain milliseconds. */
export function parseDuration(text: string, what: string): number {
  const m = /^(\d+(?:\.\d+)?)\s*(ms|s|m|h)?$/.exec(text.trim().toLowerCase());
  if (!m) throw new DpuError('DPU_ERR_CONFIG', `${what} "${text}" is not a duration; write e.g. 500ms, 30s or 2m`);
  const unit = { ms: 1, s: 1e3, m: 6e4, h: 3.6e6 }[(m[2] ?? 'ms') as 'ms'];
  return Math.round(Number(m[1]) * unit);
}

export function formatBytes(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${v.toFixed(i === 0 ? 0 : 1)} ${units[i]}`;
}

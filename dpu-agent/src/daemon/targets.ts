/**
 * Which local targets the daemon may touch, and how two paths are known to name the same
 * one. Disks (disks.ts) and erasures (erasures.ts) both go through here, so a target is
 * checked against `allowed_targets` the same way whoever asks, and a disk on
 * `/dev/disk/by-id/nvme-X` and an erasure of `/dev/nvme0n1` are seen to collide.
 */
import fs from 'node:fs';
import path from 'node:path';
import { DpuError } from '../../../image-access/src/errors.js';
import type { AgentConfig } from './config.js';

export interface ResolvedTarget {
  /** The path as given, made absolute and normalised (what a disk's spec records). */
  path: string;
  /** The path with symlinks resolved, or null when nothing exists there yet. */
  real: string | null;
}

/**
 * Checks a target path against the agent's policy: absolute, and under one of
 * `allowed_targets` both as given and with symlinks resolved (a link under an allowed
 * prefix must not lead elsewhere). Errors name `field`.
 */
export function resolveTarget(cfg: Readonly<AgentConfig>, given: string, field = 'target.path'): ResolvedTarget {
  if (!path.isAbsolute(given)) throw new DpuError('DPU_ERR_BAD_REQUEST', `${field} "${given}" must be an absolute path`, { field });
  const target = path.resolve(given);
  const allowed = (p: string): boolean => cfg.allowed_targets.some((prefix) => p.startsWith(prefix));
  let real: string | null = null;
  try {
    real = fs.realpathSync(target);
  } catch {
    // does not exist yet: a file target is created
  }
  if (!allowed(target) || (real !== null && !allowed(real))) {
    throw new DpuError('DPU_ERR_TARGET_NOT_ALLOWED', `${field} "${given}"${real && real !== target ? ` (${real})` : ''} is not under any of ${cfg.allowed_targets.join(', ')} (config key allowed_targets)`, { field });
  }
  return { path: target, real };
}

/** What identifies a target: its real path when it exists (symlinks resolved), else the normalised path. */
export function targetKey(p: string): string {
  try {
    return fs.realpathSync(p);
  } catch {
    return path.resolve(p);
  }
}

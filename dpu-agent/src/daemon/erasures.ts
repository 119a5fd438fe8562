/**
 * Erasures: a target that no disk uses is erased on request (POST /v1/erasures), in
 * `metadata` or `full` mode (local/erase.ts says what each does), while the API answers
 * at once and reports progress. The driver service uses it for Ironic's clean steps.
 *
 * Rules, and why:
 *  - A target is erased only if no disk uses it, none is being created on it and none
 *    waits for its wipe (DPU_ERR_TARGET_IN_USE / DPU_ERR_DISK_WIPING): erasing under a
 *    disk would destroy what its host reads. Conversely, the disk manager refuses a disk
 *    on a target being erased (DPU_ERR_TARGET_ERASING). Both checks and the registration
 *    run in one turn of the event loop, so neither side can slip in between.
 *  - One running erasure per target. Asking again for the same mode returns it (200): a
 *    retried request does not start a second pass; another mode is refused until it ends.
 *  - State lives in `<state_dir>/erasures/<id>.json`, written atomically when an erasure
 *    starts, every few seconds while it runs (bytes_done) and when it ends. An agent that
 *    stops (SIGTERM) cancels what runs and records it failed, DPU_ERR_ERASE_INTERRUPTED;
 *    one that crashed finds the record still `running` at start-up and records the same.
 *    Nothing resumes by itself: the target is partly erased, and the caller, who knows
 *    why it asked, asks again (the driver service does, for interrupted ones).
 *  - Finished records are kept for inspection, the newest MAX_FINISHED of them.
 */
import { randomBytes } from 'node:crypto';
import { EventEmitter } from 'node:events';
import fs from 'node:fs';
import path from 'node:path';
import type { Logger } from 'pino';
import type { components } from '../../../openapi/generated/dpu-agent.js';
import { DpuError } from '../../../image-access/src/errors.js';
import { writeJsonAtomic } from '../local/atomic-file.js';
import { type EraseMethod, eraseTarget, EraseTarget, rereadPartitions } from '../local/erase.js';
import type { AgentConfig } from './config.js';
import { resolveTarget, targetKey } from './targets.js';

export type ErasureView = components['schemas']['Erasure'];
export type ErasureCreate = components['schemas']['ErasureCreate'];

/** Who else uses targets: the disk manager. */
export interface TargetUsers {
  /** The disk on this target (a key from targetKey), also one being created or waiting for its wipe. */
  targetUser(key: string): { id: string; wiping: boolean } | null;
}

export interface ErasureManagerOptions {
  config: Readonly<AgentConfig>;
  log: Logger;
  targets: TargetUsers;
}

interface ErasureEvents {
  /** bytes_done grew. */
  progress: [ErasureView];
  /** The erasure ended: done or failed. */
  finished: [ErasureView];
}

interface Running {
  key: string;
  controller: AbortController;
  finished: Promise<void>;
  savedAt: number;
}

const MAX_FINISHED = 100;
const SAVE_INTERVAL_MS = 5_000;

export class ErasureManager extends EventEmitter<ErasureEvents> {
  private readonly config: Readonly<AgentConfig>;
  private readonly log: Logger;
  private readonly targets: TargetUsers;
  private readonly dir: string;
  private readonly records = new Map<string, ErasureView>();
  private readonly running = new Map<string, Running>();
  private closing = false;

  constructor(opts: ErasureManagerOptions) {
    super();
    this.config = opts.config;
    this.log = opts.log.child({ component: 'erasures' });
    this.targets = opts.targets;
    this.dir = path.join(opts.config.state_dir, 'erasures');
  }

  /** Loads the records; one still `running` was cut short by a crash and is recorded failed. */
  start(): void {
    fs.mkdirSync(this.dir, { recursive: true, mode: 0o700 });
    for (const name of fs.readdirSync(this.dir)) {
      if (!name.endsWith('.json')) continue;
      let rec: ErasureView;
      try {
        rec = JSON.parse(fs.readFileSync(path.join(this.dir, name), 'utf8')) as ErasureView;
        if (`${rec.id}.json` !== name) throw new Error(`it names erasure "${String(rec.id)}"`);
      } catch (err) {
        this.log.error({ file: name, err: (err as Error).message }, 'ignoring an unreadable erasure record');
        continue;
      }
      if (rec.state === 'running') {
        const e = new DpuError('DPU_ERR_ERASE_INTERRUPTED', `the agent restarted while it ran (${rec.bytes_done} of ${rec.bytes_total} bytes recorded erased); erase ${rec.target.path} again`);
        rec = { ...rec, state: 'failed', finished_at: new Date().toISOString(), last_error: e.message, error_code: e.code };
        this.save(rec);
        this.log.warn({ erasure: rec.id, target: rec.target.path, mode: rec.mode }, 'an erasure was interrupted by a restart; recorded failed');
      }
      this.records.set(rec.id, rec);
    }
  }

  list(): ErasureView[] {
    return [...this.records.values()].sort((a, b) => a.started_at.localeCompare(b.started_at) || a.id.localeCompare(b.id));
  }

  get(id: string): ErasureView {
    const rec = this.records.get(id);
    if (!rec) throw new DpuError('DPU_ERR_NOT_FOUND', `no erasure "${id}"`);
    return rec;
  }

  /** The running erasure of a target (a targetKey), if any. */
  erasing(key: string): ErasureView | null {
    for (const [id, r] of this.running) if (r.key === key) return this.records.get(id) ?? null;
    return null;
  }

  /**
   * Starts erasing a target, or returns the erasure already running on it in this mode
   * (`created` false). Everything up to the registration is synchronous (see the top).
   */
  create(req: ErasureCreate): { erasure: ErasureView; created: boolean } {
    const resolved = resolveTarget(this.config, req.target.path);
    if (resolved.real === null && resolved.path.startsWith('/dev/')) {
      throw new DpuError('DPU_ERR_BAD_REQUEST', `target.path "${req.target.path}": no such device`, { field: 'target.path' });
    }
    const key = targetKey(resolved.path);
    const current = this.erasing(key);
    if (current) {
      if (current.mode === req.mode) return { erasure: current, created: false };
      throw new DpuError('DPU_ERR_TARGET_ERASING', `erasure "${current.id}" (${current.mode}) of ${current.target.path} is running; wait for it to end`, { field: 'target.path' });
    }
    const user = this.targets.targetUser(key);
    if (user?.wiping) throw new DpuError('DPU_ERR_DISK_WIPING', `${resolved.path} is not wiped yet since disk "${user.id}" was deleted; DELETE that disk again to retry the wipe`, { field: 'target.path' });
    if (user) throw new DpuError('DPU_ERR_TARGET_IN_USE', `${resolved.path} is the target of disk "${user.id}"; delete the disk before erasing its target`, { field: 'target.path' });
    if (this.closing) throw new DpuError('DPU_ERR_SHUTTING_DOWN', 'the agent is stopping');
    const target = EraseTarget.open(resolved.path);
    const planned: EraseMethod = target.kind === 'absent' ? 'none' : req.mode === 'metadata' ? 'write' : target.kind === 'file' ? 'truncate' : 'zeroout';
    const rec: ErasureView = {
      id: `e-${Date.now().toString(36)}-${randomBytes(4).toString('hex')}`,
      target: { path: resolved.path, kind: target.kind },
      mode: req.mode,
      state: 'running',
      method: planned,
      partitions: null,
      bytes_done: 0,
      bytes_total: req.mode === 'full' ? target.size : 0,
      started_at: new Date().toISOString(),
      finished_at: null,
      last_error: null,
      error_code: null,
    };
    try {
      this.save(rec);
    } catch (err) {
      target.close();
      throw err;
    }
    this.records.set(rec.id, rec);
    const controller = new AbortController();
    const run: Running = { key, controller, finished: Promise.resolve(), savedAt: Date.now() };
    this.running.set(rec.id, run);
    run.finished = this.work(rec.id, target, run);
    this.prune();
    this.log.info({ erasure: rec.id, target: rec.target.path, kind: target.kind, mode: rec.mode, bytes: target.size }, 'erasure started');
    return { erasure: rec, created: true };
  }

  /** Stops a running erasure (it ends failed, DPU_ERR_ERASE_CANCELLED); a finished one is returned as it is. */
  async cancel(id: string): Promise<ErasureView> {
    this.get(id);
    const run = this.running.get(id);
    if (run) {
      run.controller.abort(new DpuError('DPU_ERR_ERASE_CANCELLED', 'cancelled through the API'));
      await run.finished;
    }
    return this.get(id);
  }

  /** Stops every running erasure, recording each one interrupted. */
  async close(): Promise<void> {
    this.closing = true;
    const all = [...this.running.values()];
    for (const r of all) r.controller.abort(new DpuError('DPU_ERR_ERASE_INTERRUPTED', 'the agent stopped while it ran; erase the target again'));
    await Promise.all(all.map((r) => r.finished));
  }

  private async work(id: string, target: EraseTarget, run: Running): Promise<void> {
    const update = (fields: Partial<ErasureView>): ErasureView => {
      const rec = { ...this.records.get(id)!, ...fields };
      this.records.set(id, rec);
      return rec;
    };
    const log = this.log.child({ erasure: id, target: target.path });
    const t0 = Date.now();
    try {
      const outcome = await eraseTarget(target, this.records.get(id)!.mode, {
        signal: run.controller.signal,
        planned: (total, partitions) => update({ bytes_total: total, partitions }),
        progress: (done, total) => {
          const rec = update({ bytes_done: done, bytes_total: total });
          this.emit('progress', rec);
          if (Date.now() - run.savedAt >= SAVE_INTERVAL_MS) {
            run.savedAt = Date.now();
            this.trySave(rec, log);
          }
        },
        warn: (msg, detail) => log.warn(detail ?? {}, msg),
      });
      target.close();
      if (target.kind === 'block' && this.records.get(id)!.mode === 'metadata') {
        const why = await rereadPartitions(target.path);
        if (why) log.debug({ why }, 'the kernel did not re-read the partition table');
      }
      const rec = update({ state: 'done', method: outcome.method, partitions: outcome.partitions, bytes_done: outcome.bytes, bytes_total: outcome.bytes, finished_at: new Date().toISOString() });
      this.trySave(rec, log);
      log.info({ mode: rec.mode, method: rec.method, bytes: rec.bytes_total, partitions: rec.partitions, ms: Date.now() - t0 }, 'erasure done');
    } catch (err) {
      target.close();
      const e = err instanceof DpuError && ['DPU_ERR_ERASE_CANCELLED', 'DPU_ERR_ERASE_INTERRUPTED'].includes(err.code) ? err : new DpuError('DPU_ERR_ERASE_FAILED', `${target.path}: ${(err as Error).message}`, { cause: err });
      const rec = update({ state: 'failed', finished_at: new Date().toISOString(), last_error: e.message, error_code: e.code });
      this.trySave(rec, log);
      log[e.code === 'DPU_ERR_ERASE_FAILED' ? 'error' : 'warn']({ code: e.code, done: rec.bytes_done, total: rec.bytes_total }, 'erasure failed');
    } finally {
      this.running.delete(id);
      this.emit('finished', this.records.get(id)!);
    }
  }

  private save(rec: ErasureView): void {
    writeJsonAtomic(path.join(this.dir, `${rec.id}.json`), rec);
  }

  /** A record that cannot be written is logged: the erasure itself is what matters. */
  private trySave(rec: ErasureView, log: Logger): void {
    try {
      this.save(rec);
    } catch (err) {
      log.error({ err: (err as Error).message }, 'cannot write the erasure record');
    }
  }

  /** Forgets the oldest finished records beyond MAX_FINISHED. */
  private prune(): void {
    const finished = this.list().filter((r) => r.state !== 'running');
    for (const r of finished.slice(0, Math.max(0, finished.length - MAX_FINISHED))) {
      this.records.delete(r.id);
      fs.rmSync(path.join(this.dir, `${r.id}.json`), { force: true });
    }
  }
}

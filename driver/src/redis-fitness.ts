/**
 * Is this Redis fit to hold deployments? Everything the service acknowledges — a
 * deployment record, its jobs — lives only in Redis. Two settings lose it silently:
 *
 *   maxmemory-policy   anything but `noeviction` lets Redis drop keys under memory
 *                      pressure (a record, a job's hash, a lock) with no error to anyone;
 *                      `noeviction` makes a full Redis refuse writes instead, which the
 *                      service reports (503, job retries). Refused at start unless
 *                      `redis.allow_eviction`.
 *   persistence        with neither an append-only file (`appendonly yes`) nor RDB
 *                      snapshots (a non-empty `save`), a Redis restart forgets every
 *                      deployment; reconcile (reconcile.ts) then finds their disks as
 *                      orphans. Warned about, refused with `redis.require_persistence`.
 *
 * Read with CONFIG GET. Managed Redis services disable or rename CONFIG: then INFO is read
 * instead (`maxmemory_policy` in INFO memory, `aof_enabled` in INFO persistence). INFO does
 * not say whether snapshots are scheduled, so without AOF the persistence is `unknown`,
 * and the message says what to verify by hand.
 */
import type { Redis } from 'ioredis';
import type { Logger } from 'pino';
import type { DriverConfig } from './config.js';
import { DriverError } from './errors.js';

export type PersistenceMode = 'aof' | 'rdb' | 'none' | 'unknown';
export const PERSISTENCE_MODES: readonly PersistenceMode[] = ['aof', 'rdb', 'none', 'unknown'];

export interface RedisFitness {
  /** `aof` whenever the append-only file is on (Redis loads it rather than a snapshot), `rdb` for snapshots only. */
  persistence: PersistenceMode;
  /** As Redis names it, or `unknown`. */
  maxmemory_policy: string;
  /** `always`, `everysec` or `no` with AOF on (CONFIG only). */
  appendfsync: string | null;
  /** The snapshot schedule, e.g. `3600 1 300 100 60 10000`; '' for none (CONFIG only). */
  save: string | null;
  /** Replicas connected to the primary (INFO replication), null when it could not be read. */
  replicas: number | null;
  /** How it was read: CONFIG GET, or INFO when CONFIG is refused. */
  via: 'config' | 'info';
  /** Why CONFIG could not be used, when it could not. */
  config_error: string | null;
  checked_at: string;
}

/** Reads the settings; throws only when Redis cannot be asked at all. */
export async function inspectRedis(redis: Redis): Promise<RedisFitness> {
  const checked_at = new Date().toISOString();
  const replicas = await countReplicas(redis);
  try {
    const get = async (name: string): Promise<string> => {
      const r = (await redis.call('CONFIG', 'GET', name)) as string[];
      if (!Array.isArray(r) || r.length < 2) throw new Error(`CONFIG GET ${name} answered nothing`);
      return String(r[1]);
    };
    const policy = await get('maxmemory-policy');
    const appendonly = (await get('appendonly')) === 'yes';
    const save = (await get('save')).trim();
    const appendfsync = appendonly ? await get('appendfsync') : null;
    return { persistence: appendonly ? 'aof' : save ? 'rdb' : 'none', maxmemory_policy: policy, appendfsync, save, replicas, via: 'config', config_error: null, checked_at };
  } catch (err) {
    // A renamed or disabled CONFIG (managed Redis), or an ACL without it: INFO instead.
    // A connection error fails INFO too, and is thrown from there.
    const configError = (err as Error).message.trim();
    const fields = parseInfo(String(await redis.call('INFO', 'persistence')) + '\n' + String(await redis.call('INFO', 'memory')));
    const aof = fields.get('aof_enabled');
    return {
      persistence: aof === '1' ? 'aof' : 'unknown',
      maxmemory_policy: fields.get('maxmemory_policy') ?? 'unknown',
      appendfsync: null,
      save: null,
      replicas,
      via: 'info',
      config_error: configError,
      checked_at,
    };
  }
}

/** connected_slaves of INFO replication; null when INFO is refused (an ACL without it). A connection error is thrown. */
async function countReplicas(redis: Redis): Promise<number | null> {
  let text: string;
  try {
    text = String(await redis.call('INFO', 'replication'));
  } catch (err) {
    if (/NOPERM|unknown command/i.test((err as Error).message)) return null;
    throw err;
  }
  const n = Number(parseInfo(text).get('connected_slaves'));
  return Number.isInteger(n) ? n : null;
}

export function parseInfo(text: string): Map<string, string> {
  const out = new Map<string, string>();
  for (const line of text.split(/\r?\n/)) {
    const i = line.indexOf(':');
    if (i > 0 && !line.startsWith('#')) out.set(line.slice(0, i), line.slice(i + 1).trim());
  }
  return out;
}

export interface FitnessVerdict {
  /** Why the service must not start on this Redis; null when it may. */
  refuse: string | null;
  /** What to log as warnings (also when refusing). */
  warnings: string[];
}

/** Applies `redis.allow_eviction` and `redis.require_persistence` to what was read. */
export function judgeRedis(f: RedisFitness, cfg: Readonly<DriverConfig['redis']>, where: string): FitnessVerdict {
  const warnings: string[] = [];
  let refuse: string | null = null;
  const byHand = f.via === 'info' ? ` (CONFIG GET was refused: ${f.config_error}; read from INFO instead)` : '';
  if (f.maxmemory_policy === 'unknown') {
    warnings.push(`could not read maxmemory-policy of Redis at ${where}${byHand}: verify by hand that it is noeviction (redis.conf or the provider's parameter group)`);
  } else if (f.maxmemory_policy !== 'noeviction') {
    const msg =
      `Redis at ${where} has maxmemory-policy ${f.maxmemory_policy}: under memory pressure it drops keys — deployment records, jobs, job locks — without an error, ` +
      `losing deployments the service has acknowledged. Fix: CONFIG SET maxmemory-policy noeviction on Redis and "maxmemory-policy noeviction" in redis.conf (or the provider's parameter group)`;
    if (cfg.allow_eviction) warnings.push(`${msg}; running anyway because redis.allow_eviction is true`);
    else refuse = `${msg}, or set redis.allow_eviction: true to run anyway`;
  }
  if (f.persistence === 'none' || f.persistence === 'unknown') {
    const msg =
      f.persistence === 'none'
        ? `Redis at ${where} persists nothing (appendonly no, save ""): a Redis restart forgets every deployment and job (their disks stay on the DPU agents, found by reconcile as orphans). ` +
          `Fix: CONFIG SET appendonly yes (with appendfsync everysec) and "appendonly yes" in redis.conf, or RDB snapshots (save "300 10")`
        : `could not tell whether Redis at ${where} persists its data${byHand}; the append-only file is off, and INFO does not say whether RDB snapshots are scheduled: ` +
          `verify by hand that snapshots or the provider's persistence/backup are on`;
    if (cfg.require_persistence) refuse ??= `${msg}; redis.require_persistence is true${f.persistence === 'unknown' ? ' (set it to false once verified by hand)' : ''}`;
    else warnings.push(msg);
  }
  if (cfg.wait_replicas > 0 && f.replicas !== null && f.replicas < cfg.wait_replicas) {
    warnings.push(
      `Redis at ${where} has ${f.replicas} replica(s) connected, and redis.wait_replicas is ${cfg.wait_replicas}: until ${cfg.wait_replicas} are, every request that changes something is answered 503 DRV_ERR_REDIS_REPLICATION (the change is kept on the primary, not yet safe from a failover)`,
    );
  }
  if (f.persistence === 'aof' && f.appendfsync === 'no') {
    warnings.push(`Redis at ${where} has appendfsync no: the kernel decides when the append-only file reaches the disk, so a power loss can lose the last ~30 s of acknowledged deployments; everysec loses at most ~1 s`);
  }
  return { refuse, warnings };
}

/**
 * The service's view of its Redis: checked once at start (refusing to start on an unfit
 * Redis) and again every `redis.check_interval_ms` while it runs, a change logged once.
 */
export class RedisFitnessMonitor {
  current: RedisFitness | null = null;
  private timer: NodeJS.Timeout | null = null;
  private lastVerdict = '';

  constructor(
    private readonly cfg: Readonly<DriverConfig['redis']>,
    private readonly log: Logger,
    private readonly where: string,
  ) {}

  /**
   * The start-up check, on a connection of its own. Throws DRV_ERR_REDIS_UNFIT when the
   * service must not start. An unreachable Redis does not stop the start (the service
   * reports it and waits, as ever): the check runs when the periodic one first reaches it.
   */
  async checkAtStart(connect: () => Redis): Promise<void> {
    const redis = connect();
    redis.on('error', () => undefined);
    let f: RedisFitness;
    try {
      await redis.connect();
      f = await inspectRedis(redis);
    } catch (err) {
      this.log.warn({ redis: this.where, err: (err as Error).message }, 'Redis is unreachable at start: its eviction policy and persistence are checked once it answers');
      return;
    } finally {
      redis.disconnect();
    }
    const verdict = judgeRedis(f, this.cfg, this.where);
    this.record(f, verdict, true);
    if (verdict.refuse) throw new DriverError('DRV_ERR_REDIS_UNFIT', verdict.refuse);
  }

  /** Re-checks on `redis` every `redis.check_interval_ms` (if not 0). */
  start(redis: Redis): void {
    if (!this.cfg.check_interval_ms) return;
    const tick = async (): Promise<void> => {
      try {
        const f = await inspectRedis(redis);
        this.record(f, judgeRedis(f, this.cfg, this.where), false);
      } catch {
        // Unreachable: health says so; the last reading stands.
      }
      if (this.timer) this.timer = setTimeout(() => void tick(), this.delay()).unref();
    };
    this.timer = setTimeout(() => void tick(), this.delay()).unref();
  }

  /** Until a first reading (Redis unreachable at start), every few seconds; then every check_interval_ms. */
  private delay(): number {
    return this.current ? this.cfg.check_interval_ms : Math.min(this.cfg.check_interval_ms, 5000);
  }

  stop(): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
  }

  /** Logs the verdict when it differs from the last one (the first one always). */
  private record(f: RedisFitness, v: FitnessVerdict, atStart: boolean): void {
    this.current = f;
    const key = JSON.stringify([v.refuse, v.warnings]);
    if (key === this.lastVerdict) return;
    const first = this.lastVerdict === '';
    this.lastVerdict = key;
    const fields = { redis: this.where, persistence: f.persistence, maxmemory_policy: f.maxmemory_policy, appendfsync: f.appendfsync, via: f.via };
    // At start a refusal is thrown (and printed by the CLI). Later — Redis unreachable at
    // start, or reconfigured since — it cannot stop a running service: an error line says
    // it, and /v1/health and the metrics show it.
    if (v.refuse && !atStart) this.log.error({ ...fields, code: 'DRV_ERR_REDIS_UNFIT' }, v.refuse);
    for (const w of v.warnings) this.log.warn(fields, w);
    if (!v.refuse && v.warnings.length === 0) this.log.info(fields, first ? 'Redis checked: noeviction, persistent' : 'Redis is fit again: noeviction, persistent');
  }
}

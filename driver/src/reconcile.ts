/**
 * Reconcile: the DPU agents' disks against the deployment records.
 *
 * An *orphan* is a disk on an agent the service knows, whose id is the driver's
 * (`<node>-<deployment>`, `reconcile.disk_id_pattern`), and that no deployment record in
 * Redis names — in any state. How one comes about: a Redis that lost its data (not
 * persistent, restored from an old backup), an attach that finished after its deployment
 * was torn down and could not delete what it made, a disk created by hand with a
 * driver-style id. Orphans hold a DPU target and, until wiped, a tenant's data.
 *
 * A pass (one at a time across every driver process on this Redis, under a lock):
 *
 *   1. the agents: those the attach job registered (`<prefix>:agents`: URL and token as
 *      driver_info gave them), those the records name, and `reconcile.agents`;
 *   2. list every agent's disks, THEN read the records. A record is written before its
 *      disk is created (POST /v1/deployments, then the attach job), so a listed disk whose
 *      record is not found afterwards has none, or lost it since — never "not yet";
 *   3. orphans are kept in `<prefix>:orphans` with the time they were first seen; one that
 *      is no longer an orphan (its record appeared, the disk went) is dropped. Each is
 *      logged once when found and once when it goes;
 *   4. with `reconcile.remove_orphans`, an orphan first seen at least `reconcile.grace_ms`
 *      ago is deleted with wipe — after the records are read once more, and never while
 *      any record names its disk id, on any agent (a disk id names its node);
 *   5. the reverse: a `complete` record whose disk its agent no longer has (asked once
 *      more by id) is marked `failed`. A `ready` record is the monitor job's: it polls the
 *      disk and fails the deployment on a 404 itself; once `complete` nothing polls it.
 *
 * An agent that cannot be listed is reported (GET /v1/orphans `agents`, the log on the
 * first failure) and its orphans are kept as last seen, never removed in that pass.
 *
 * Tokens are secrets: kept in Redis like the deployment's create request, never returned
 * by the API and never logged.
 */
import { randomUUID } from 'node:crypto';
import type { Redis } from 'ioredis';
import type { Logger } from 'pino';
import type { AgentClient, Disk } from '../../openapi/clients/agent-client.js';
import { ApiError } from '../../openapi/clients/http.js';
import type { DriverConfig } from './config.js';
import { agentClient } from './jobs.js';
import type { DeploymentRecord, DeploymentStore } from './store.js';

export interface OrphanEntry {
  agent_url: string;
  disk_id: string;
  /** The agent's state of the disk: streaming, complete, failed, wiping. */
  state: string;
  size: number;
  target: string;
  /** When the agent created the disk (its clock). */
  disk_created_at: string;
  first_seen_at: string;
  last_seen_at: string;
  /** Why removing it failed last, if it did. */
  last_error: string | null;
}

export interface AgentScan {
  agent_url: string;
  scanned_at: string;
  /** Why it could not be listed; null when it was. */
  error: string | null;
}

export interface ReconcileReport {
  started_at: string;
  finished_at: string;
  agents: number;
  agents_failed: number;
  orphans: number;
  removed: number;
  /** Why no orphan was removed although some were due (reconcile.max_removals), else null. */
  removal_held: string | null;
  /** Complete deployments whose disk was gone, marked failed. */
  records_failed: number;
}

const LOCK_TTL_MS = 60_000;

// KEYS[1] lock; ARGV[1] owner; ARGV[2] ttl. Extends the lock only while it is ours.
const RENEW_LUA = `if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0`;
const RELEASE_LUA = `if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0`;

export function normalizeAgentUrl(url: string): string {
  return url.replace(/\/+$/, '');
}

/** The Redis side of reconcile: the agent registry, the orphans, the last pass. */
export class ReconcileStore {
  constructor(
    private readonly redis: Redis,
    private readonly prefix: string,
  ) {}

  private get agentsKey(): string {
    return `${this.prefix}:agents`;
  }
  get orphansKey(): string {
    return `${this.prefix}:orphans`;
  }
  get scansKey(): string {
    return `${this.prefix}:reconcile:agents`;
  }
  get lastKey(): string {
    return `${this.prefix}:reconcile:last`;
  }
  get lockKey(): string {
    return `${this.prefix}:reconcile:lock`;
  }
  get nextKey(): string {
    return `${this.prefix}:reconcile:next`;
  }

  /** Remembers an agent the service uses (before it creates a disk there). */
  async register(url: string, token: string | undefined): Promise<void> {
    await this.redis.hset(this.agentsKey, normalizeAgentUrl(url), JSON.stringify(token ? { token } : {}));
  }

  async registered(): Promise<Map<string, string | undefined>> {
    const h = await this.redis.hgetall(this.agentsKey);
    return new Map(Object.entries(h).map(([url, v]) => [url, (JSON.parse(v) as { token?: string }).token]));
  }

  /** Forgets an agent (decommissioned); true when it was registered. */
  async forget(url: string): Promise<boolean> {
    const u = normalizeAgentUrl(url);
    const n = await this.redis.hdel(this.agentsKey, u);
    await this.redis.hdel(this.scansKey, u);
    return n > 0;
  }

  async orphans(): Promise<OrphanEntry[]> {
    const h = await this.redis.hgetall(this.orphansKey);
    return Object.values(h)
      .map((v) => JSON.parse(v) as OrphanEntry)
      .sort((a, b) => a.agent_url.localeCompare(b.agent_url) || a.disk_id.localeCompare(b.disk_id));
  }

  async orphanCount(): Promise<number> {
    return this.redis.hlen(this.orphansKey);
  }

  async scans(): Promise<AgentScan[]> {
    const h = await this.redis.hgetall(this.scansKey);
    return Object.values(h)
      .map((v) => JSON.parse(v) as AgentScan)
      .sort((a, b) => a.agent_url.localeCompare(b.agent_url));
  }

  async last(): Promise<ReconcileReport | null> {
    const v = await this.redis.get(this.lastKey);
    return v ? (JSON.parse(v) as ReconcileReport) : null;
  }

  static field(agentUrl: string, diskId: string): string {
    return `${agentUrl} ${diskId}`;
  }
}

export interface ReconcilerDeps {
  redis: Redis;
  store: DeploymentStore;
  config: Readonly<DriverConfig>;
  log: Logger;
  /** Counts removed orphans (metrics.ts). */
  onRemoved?: () => void;
}

export class Reconciler {
  readonly rs: ReconcileStore;
  private timer: NodeJS.Timeout | null = null;
  private running: Promise<unknown> | null = null;
  private failing = false;

  constructor(private readonly deps: ReconcilerDeps) {
    this.rs = new ReconcileStore(deps.redis, deps.config.redis.prefix);
  }

  /**
   * Every process ticks; a pass starts at most once per `reconcile.interval_ms` across all
   * of them (`<prefix>:reconcile:next`, SET NX with that expiry) and only under the lock.
   */
  start(): void {
    const interval = this.deps.config.reconcile.interval_ms;
    if (!interval) return;
    const tickMs = Math.max(50, Math.min(Math.floor(interval / 4), 30_000));
    const tick = async (): Promise<void> => {
      if (!this.timer) return;
      if (!this.running) {
        this.running = this.scheduled(interval).finally(() => (this.running = null));
        await this.running;
      }
      if (this.timer) this.timer = setTimeout(() => void tick(), tickMs);
    };
    this.timer = setTimeout(() => void tick(), 0);
  }

  /** Stops the schedule and waits for a running pass. */
  async stop(): Promise<void> {
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    await this.running;
  }

  private async scheduled(interval: number): Promise<void> {
    // Not connected (yet, or Redis is away): nothing to do until it is; health says why.
    if (this.deps.redis.status !== 'ready') return;
    try {
      const due = await this.deps.redis.set(this.rs.nextKey, '1', 'PX', interval, 'NX');
      if (due !== 'OK') return;
      const report = await this.locked(() => this.pass(false));
      if (report && this.failing) this.deps.log.info('reconcile passes run again');
      if (report) this.failing = false;
    } catch (err) {
      if (!this.failing) this.deps.log.warn({ err: (err as Error).message }, 'reconcile pass failed (repeats are not logged until one succeeds)');
      this.failing = true;
    }
  }

  /**
   * One pass now (`smartnic-driver reconcile`), waiting up to `waitMs` for a running one
   * to end. `dryRun`: report, never remove or mark anything.
   */
  async runOnce(opts: { dryRun?: boolean; waitMs?: number } = {}): Promise<ReconcileReport> {
    const deadline = Date.now() + (opts.waitMs ?? LOCK_TTL_MS);
    for (;;) {
      const report = await this.locked(() => this.pass(opts.dryRun ?? false));
      if (report) return report;
      if (Date.now() > deadline) throw new Error('another reconcile pass holds the lock (a driver process is running one); try again');
      await new Promise((r) => setTimeout(r, 200));
    }
  }

  /** Runs `fn` holding the lock (renewed while it runs); null when another holder has it. */
  private async locked<T>(fn: () => Promise<T>): Promise<T | null> {
    const { redis } = this.deps;
    const owner = randomUUID();
    if ((await redis.set(this.rs.lockKey, owner, 'PX', LOCK_TTL_MS, 'NX')) !== 'OK') return null;
    let lost = false;
    const renew = setInterval(() => {
      redis.eval(RENEW_LUA, 1, this.rs.lockKey, owner, LOCK_TTL_MS).then(
        (r) => {
          if (r !== 1) lost = true;
        },
        () => undefined,
      );
    }, LOCK_TTL_MS / 3);
    this.lockLost = () => lost;
    try {
      return await fn();
    } finally {
      clearInterval(renew);
      this.lockLost = () => false;
      await redis.eval(RELEASE_LUA, 1, this.rs.lockKey, owner).catch(() => undefined);
    }
  }

  /** Whether the running pass lost its lock (Redis away longer than the lock's expiry): it then removes nothing more. */
  private lockLost: () => boolean = () => false;

  private async agentsToScan(records: DeploymentRecord[]): Promise<Map<string, string | undefined>> {
    const out = new Map<string, string | undefined>();
    const put = (url: string, token: string | undefined): void => {
      const u = normalizeAgentUrl(url);
      out.set(u, token ?? out.get(u));
    };
    for (const r of records) put(r.agent_url, r.spec.driver_info?.smartnic_agent_token);
    for (const [url, token] of await this.rs.registered()) put(url, token);
    for (const a of this.deps.config.reconcile.agents) put(a.url, a.token);
    return out;
  }

  private client(url: string, token: string | undefined): AgentClient {
    return agentClient(this.deps.config, url, token);
  }

  private async pass(dryRun: boolean): Promise<ReconcileReport> {
    const { redis, store, config, log } = this.deps;
    const cfg = config.reconcile;
    const started = new Date();
    const pattern = new RegExp(cfg.disk_id_pattern);
    const agents = await this.agentsToScan(await store.list());

    // 1. List the disks (bounded concurrency), before the records are read (see the top).
    const listed = new Map<string, Disk[]>();
    const scans: AgentScan[] = [];
    await eachLimit([...agents], cfg.concurrency, async ([url, token]) => {
      let error: string | null = null;
      try {
        listed.set(url, await this.client(url, token).listDisks());
      } catch (err) {
        error = (err as Error).message;
      }
      scans.push({ agent_url: url, scanned_at: new Date().toISOString(), error });
    });
    const previousScans = new Map((await this.rs.scans()).map((s) => [s.agent_url, s]));
    for (const s of scans) {
      const before = previousScans.get(s.agent_url);
      if (s.error && !before?.error) log.warn({ agent: s.agent_url, err: s.error }, 'reconcile cannot list the disks of a DPU agent; its orphans are not looked for until it answers');
      else if (!s.error && before?.error) log.info({ agent: s.agent_url }, 'reconcile lists the disks of the DPU agent again');
    }
    if (scans.length) await redis.hset(this.rs.scansKey, ...scans.flatMap((s) => [s.agent_url, JSON.stringify(s)]));

    // 2. The records, read after the listings.
    let records = await store.list();
    let named = new Set(records.map((r) => r.disk_id));

    // 3. The orphans of every agent that answered.
    const now = new Date().toISOString();
    const prior = new Map((await this.rs.orphans()).map((o) => [ReconcileStore.field(o.agent_url, o.disk_id), o]));
    const current = new Map<string, OrphanEntry>();
    for (const [url, disks] of listed) {
      for (const d of disks) {
        if (!pattern.test(d.id) || named.has(d.id)) continue;
        const key = ReconcileStore.field(url, d.id);
        const before = prior.get(key);
        const same = before && before.disk_created_at === d.created_at;
        const entry: OrphanEntry = {
          agent_url: url,
          disk_id: d.id,
          state: d.state,
          size: d.size,
          target: d.target.path,
          disk_created_at: d.created_at,
          first_seen_at: same ? before.first_seen_at : now,
          last_seen_at: now,
          last_error: same ? before.last_error : null,
        };
        current.set(key, entry);
        if (!same) log.warn({ agent: url, disk: d.id, state: d.state, target: d.target.path, size: d.size }, 'orphan disk: no deployment record names it');
      }
    }
    // Dropped: gone from an agent that answered, or of an agent no longer scanned (forgotten).
    const dropped = [...prior.entries()].filter(([key, o]) => (listed.has(o.agent_url) || !agents.has(o.agent_url)) && !current.has(key));
    for (const [, o] of dropped) log.info({ agent: o.agent_url, disk: o.disk_id }, 'no longer an orphan disk (deleted, or a deployment record names it)');
    if (dropped.length) await redis.hdel(this.rs.orphansKey, ...dropped.map(([key]) => key));
    if (current.size) await redis.hset(this.rs.orphansKey, ...[...current].flatMap(([key, o]) => [key, JSON.stringify(o)]));

    // 4. Remove those past their grace period.
    let removed = 0;
    let held: string | null = null;
    let due = [...current.values()].filter((o) => Date.now() - Date.parse(o.first_seen_at) >= cfg.grace_ms);
    if (cfg.remove_orphans && !dryRun && due.length) {
      // Read again right before deleting: a deployment created since step 2 protects its disk.
      records = await store.list();
      named = new Set(records.map((r) => r.disk_id));
      due = due.filter((o) => !named.has(o.disk_id));
      // Leftovers of races come one or two at a time. Many at once look like lost records
      // (a Redis that lost its data), whose disks may be running hosts: hold, and say so.
      if (due.length > cfg.max_removals) {
        held =
          `${due.length} orphan disks are due for removal, more than reconcile.max_removals (${cfg.max_removals}): that looks like lost deployment records ` +
          `(a Redis that lost its data) rather than leftovers, and their hosts may still run from them. None removed. Check GET /v1/orphans against Ironic's active nodes; ` +
          `then remove them by hand, or raise reconcile.max_removals`;
        const before = await this.rs.last().catch(() => null);
        if (before?.removal_held !== held) log.error({ due: due.length, max_removals: cfg.max_removals }, held);
        due = [];
      }
      for (const o of due) {
        if (this.lockLost()) break;
        const key = ReconcileStore.field(o.agent_url, o.disk_id);
        try {
          await this.client(o.agent_url, agents.get(o.agent_url))
            .deleteDisk(o.disk_id, true)
            .catch((err: unknown) => {
              if (err instanceof ApiError && err.status === 404) return null; // gone meanwhile
              throw err;
            });
          await redis.hdel(this.rs.orphansKey, key);
          removed++;
          this.deps.onRemoved?.();
          log.warn({ agent: o.agent_url, disk: o.disk_id, target: o.target, first_seen_at: o.first_seen_at }, 'orphan disk removed (deleted and wiped on the DPU agent)');
        } catch (err) {
          const message = (err as Error).message;
          if (message !== o.last_error) log.warn({ agent: o.agent_url, disk: o.disk_id, err: message }, 'removing an orphan disk failed; the next pass tries again');
          await redis.hset(this.rs.orphansKey, key, JSON.stringify({ ...o, last_error: message }));
        }
      }
    }

    // 5. Complete deployments whose disk is gone from an agent that answered. Only records
    // last changed before the listing: anything newer may have a disk the listing missed.
    let recordsFailed = 0;
    for (const r of records) {
      const disks = listed.get(normalizeAgentUrl(r.agent_url));
      if (dryRun || r.state !== 'complete' || !disks || disks.some((d) => d.id === r.disk_id) || Date.parse(r.updated_at) >= started.getTime()) continue;
      const gone = await this.client(r.agent_url, agents.get(normalizeAgentUrl(r.agent_url)))
        .getDisk(r.disk_id)
        .then(
          () => false,
          (err: unknown) => err instanceof ApiError && err.status === 404,
        );
      if (!gone) continue;
      const message = `DRV_ERR_AGENT_REJECTED: the DPU agent at ${r.agent_url} no longer has disk ${r.disk_id} (found by reconcile)`;
      if (await store.update(r.node_uuid, r.deployment_id, { state: 'failed', last_error: message })) {
        recordsFailed++;
        log.warn({ node: r.node_uuid, agent: r.agent_url, disk: r.disk_id }, 'a complete deployment has lost its disk: marked failed');
      }
    }

    const report: ReconcileReport = {
      started_at: started.toISOString(),
      finished_at: new Date().toISOString(),
      agents: agents.size,
      agents_failed: scans.filter((s) => s.error).length,
      orphans: current.size - removed + [...prior.values()].filter((o) => agents.has(o.agent_url) && !listed.has(o.agent_url)).length,
      removed,
      removal_held: held,
      records_failed: recordsFailed,
    };
    await redis.set(this.rs.lastKey, JSON.stringify(report));
    log.debug(report, 'reconcile pass done');
    return report;
  }
}

/** Runs `fn` over `items`, at most `limit` at a time. */
async function eachLimit<T>(items: T[], limit: number, fn: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  const worker = async (): Promise<void> => {
    while (next < items.length) await fn(items[next++]!);
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
}

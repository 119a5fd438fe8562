/**
 * The tracker of peer-to-peer regions (issue #15, docs/fleet.md): which DPU agents hold
 * disks of which image content, so that disks of the same image read each other's
 * verified regions before the origin. The agents do the copying (GET /v1/disks/{id}/image,
 * PUT /v1/disks/{id}/peers); the driver decides who may read whom and with what token.
 *
 *   group    the image's manifest key (manifests.ts manifestKey): format, region size and
 *            content digest or identity. Peers are only ever asked while a disk can verify
 *            what they send (it has the manifest), and the key names that manifest. An image
 *            with nothing naming its content has no group: its disks read the origin alone.
 *   token    one per group: base64url(HMAC-SHA256(secret, key)). Every driver process
 *            derives the same token with no coordination; a disk is created with it (its
 *            `peers.token`) and presents it to its peers. The secret is `peers.secret`, or
 *            one made at random the first time and kept in Redis (`<prefix>:peers:secret`,
 *            SET NX, so concurrent drivers agree). A token opens only the regions of disks
 *            of that image content, and only their verified, unwritten ones (the agent's
 *            rule). A token holder (any disk of the image) can also read which regions of another
 *            disk of the image are served, so which ones its host has written (not what
 *            it wrote): tokens go only to the image's disks, on the DPUs' network.
 *   holders  `<prefix>:peers:<sha256 of key>` a hash: one field per deployment
 *            (`node/deployment`), a JSON entry {url, disk, rack, local, total, complete,
 *            until}. A hydrating disk is announced by every monitor poll and listed until
 *            `announce_ttl_ms` after the last one (a dead driver or agent drops out by
 *            itself); a complete one is listed for `seed_time_ms` after it completed
 *            (seeding); a seed whose agent does not answer the disks still copying (a node
 *            that died without a teardown) is left out of their lists and of the seeder
 *            choice while that lasts (`liveHolders`). The teardown withdraws the entry. A disk
 *            that another disk reports (its bytes failed verification there) is withdrawn
 *            and not listed again for the seeding time (`ban`). Expired entries are dropped when
 *            read; the hash itself expires after its last entry would.
 *   seeders  while no complete disk of an image is listed, its first `seeders` disks read
 *            the origin freely; the others are told `origin_wait_ms`: their agents copy
 *            only what peers have, and read the origin once the peers have gained nothing
 *            for that long (dpu-agent peer-source.ts admissible), so a fleet starting
 *            together pulls about `seeders` copies from the origin. A seeder holds a slot
 *            (`<group>:seeder:<i>`) renewed by each poll; one that goes away frees it
 *            and the next disk to poll takes it.
 *   list     what a disk is told (choosePeers): the other holders, not expired, same rack first
 *            (driver_info smartnic_rack), then complete ones, then by quarters of the
 *            image local; within those, spread by a hash of the asking deployment and the
 *            holder, so a fleet starting together does not ask the same seed first (the
 *            agent takes its list round robin). Holders with nothing local yet are listed
 *            too (last): they are about to have regions, and the agents read each other's
 *            maps of what they serve. At most `max_peers`.
 *
 * Nothing here ever fails a deployment: Redis or an agent refusing a list is a note.
 */
import { createHash, createHmac, randomBytes } from 'node:crypto';
import type { Redis } from 'ioredis';
import type { DriverConfig } from './config.js';

export interface PeerHolder {
  /** `node/deployment`: one entry per deployment. */
  deployment: string;
  /** Where peers reach its agent (driver_info smartnic_peer_url, else smartnic_agent_url). */
  url: string;
  /** Where the driver reaches its agent (smartnic_agent_url), to tell whether a seed is alive; absent in entries listed before it was kept (those are not probed). */
  agent?: string;
  disk: string;
  /** Topology label (driver_info smartnic_rack), or null. */
  rack: string | null;
  /** Regions local on its disk, of `total`, when last polled. */
  local: number;
  total: number;
  complete: boolean;
  /** Listed until (ms since the epoch). */
  until: number;
}

export interface PeerAddress {
  url: string;
  disk: string;
}

// A seeder slot is renewed or freed only by the deployment holding it: a slot that
// expired and went to another disk between a GET and a PEXPIRE/DEL must not be touched.
// KEYS[1] slot; ARGV[1] deployment; ARGV[2] 'renew' | 'free'; ARGV[3] ttl ms. 1 if held.
const SLOT_LUA = `
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == 'free' then redis.call('DEL', KEYS[1]) else redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
return 1
`;

// Lists a deployment's disk unless it is banned (PeerTracker.ban), in one step: a ban that
// lands between a check and the write would leave it listed. KEYS[1] the group's hash,
// KEYS[2] its ban key; ARGV[1] the deployment, ARGV[2] the entry, ARGV[3] the hash's ttl.
// 1 if listed.
const ANNOUNCE_LUA = `
if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('HDEL', KEYS[1], ARGV[1]) return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
`;

/** How long one probe of a seed's agent may hold its verdict key (the probe's own limit is 2 s). */
const PROBE_MS = 10_000;

/** What the agent's PeerList accepts as a peer's URL: a base URL with no path. */
const PEER_URL = /^https?:\/\/[^/?#]+\/?$/;

export class PeerTracker {
  private secret: Promise<Buffer> | null = null;

  constructor(
    private readonly redis: Redis,
    private readonly prefix: string,
    private readonly config: Readonly<DriverConfig['peers']>,
  ) {}

  get enabled(): boolean {
    return this.config.enabled;
  }

  private groupKey(key: string): string {
    return `${this.prefix}:peers:${createHash('sha256').update(key).digest('hex')}`;
  }

  /** The peer token of the image content `key` (the same in every driver process). */
  async token(key: string): Promise<string> {
    const secret = await this.secretBytes();
    return createHmac('sha256', secret).update(key).digest('base64url');
  }

  private secretBytes(): Promise<Buffer> {
    if (this.config.secret) return Promise.resolve(Buffer.from(this.config.secret, 'utf8'));
    if (!this.secret) {
      const k = `${this.prefix}:peers:secret`;
      this.secret = (async () => {
        await this.redis.set(k, randomBytes(32).toString('base64'), 'NX');
        const v = await this.redis.get(k);
        if (!v) throw new Error(`${k} vanished right after it was set`);
        return Buffer.from(v, 'base64');
      })();
      // A failure is not cached: the next call asks Redis again.
      this.secret.catch(() => (this.secret = null));
    }
    return this.secret;
  }

  /**
   * Lists (or refreshes) a deployment's disk as a holder of `key`; null, and not listed,
   * when a disk of the image reported bytes from it that failed verification (`ban`).
   */
  async announce(key: string, holder: Omit<PeerHolder, 'until'>, now = Date.now()): Promise<PeerHolder | null> {
    const k = this.groupKey(key);
    const until = now + (holder.complete ? this.config.seed_time_ms : this.config.announce_ttl_ms);
    const entry: PeerHolder = { ...holder, until };
    // The hash lives as long as its longest-listed entry might.
    const ttl = Math.max(this.config.seed_time_ms, this.config.announce_ttl_ms) + 60_000;
    const listed = await this.redis.eval(ANNOUNCE_LUA, 2, k, `${k}:banned:${holder.deployment}`, holder.deployment, JSON.stringify(entry), ttl);
    return listed === 1 ? entry : null;
  }

  /**
   * Whether this deployment's disk is one of the image's `seeders` (it reads the origin
   * without waiting for peers): not while a complete disk of the image is listed; else it
   * holds or takes one of the seeder slots (`<group>:seeder:<i>`, SET NX, expiring
   * `announce_ttl_ms` after its last poll — a seeder that goes away frees its slot).
   */
  async seeder(key: string, deployment: string, completeListed: boolean): Promise<boolean> {
    const k = this.groupKey(key);
    const slots = Array.from({ length: this.config.seeders }, (_, i) => `${k}:seeder:${i}`);
    const held = await this.redis.mget(...slots);
    const mine = held.findIndex((v) => v === deployment);
    if (mine >= 0) {
      // A complete disk serves everything now: the slot is not needed.
      const kept = await this.redis.eval(SLOT_LUA, 1, slots[mine]!, deployment, completeListed ? 'free' : 'renew', this.config.announce_ttl_ms);
      if (kept === 1) return !completeListed;
    }
    if (completeListed) return false;
    for (const slot of slots) {
      if ((await this.redis.set(slot, deployment, 'PX', this.config.announce_ttl_ms, 'NX')) === 'OK') return true;
    }
    return false;
  }

  /**
   * A disk of the image reported that this deployment's disk sent bytes that failed
   * verification (a damaged target, a tampered or buggy agent): it is withdrawn and not
   * listed again for the seeding time (`<group>:banned:<deployment>`), so no other disk is
   * sent to it and, if it was a seed, another disk of the image can seed. True the first
   * time it is reported.
   */
  async ban(key: string, deployment: string): Promise<boolean> {
    const k = this.groupKey(key);
    const first = (await this.redis.set(`${k}:banned:${deployment}`, '1', 'PX', Math.max(this.config.seed_time_ms, this.config.announce_ttl_ms), 'NX')) === 'OK';
    await this.withdraw(key, deployment);
    return first;
  }

  /** Stops listing a deployment's disk (its teardown). */
  async withdraw(key: string, deployment: string): Promise<void> {
    await this.redis.hdel(this.groupKey(key), deployment);
    await this.freeSlot(key, deployment);
  }

  /**
   * Frees the seeder slot a deployment holds, if any: at its teardown, and once its disk is
   * a seed (complete, it needs none; a seed is not polled again, and would otherwise hold
   * the slot until it expires — for a seed that then dies, the next disk's seeder slot).
   */
  async freeSlot(key: string, deployment: string): Promise<void> {
    const k = this.groupKey(key);
    for (let i = 0; i < this.config.seeders; i++) await this.redis.eval(SLOT_LUA, 1, `${k}:seeder:${i}`, deployment, 'free', 0);
  }

  /**
   * `holders` without the seeds whose agent does not answer now: a complete disk is listed
   * for its seeding time, and its node may die without a teardown to withdraw it; counted,
   * it would keep every new disk of the image from becoming a seeder (they would wait
   * origin_wait_ms for it, then each read the origin). Each seed's verdict is kept in
   * Redis (`<group>:alive:<deployment>`: 1 answered, 0 did not) for half announce_ttl_ms,
   * read for all seeds in one MGET; a seed without one is probed by whichever disk's poll
   * comes first (SET NX: one probe at a time across driver processes; meanwhile it counts
   * as alive). A silent seed is only left out while its verdict lasts: probed again, one
   * that answers is back. Entries without a driver-facing URL (listed by an older driver)
   * and `self` are not probed.
   */
  async liveHolders(key: string, holders: readonly PeerHolder[], self: string, answers: (h: PeerHolder) => Promise<boolean>): Promise<{ live: PeerHolder[]; silent: PeerHolder[] }> {
    const seeds = holders.filter((h) => h.complete && h.deployment !== self && typeof h.agent === 'string');
    if (seeds.length === 0) return { live: [...holders], silent: [] };
    const k = this.groupKey(key);
    const lasts = Math.max(1000, Math.floor(this.config.announce_ttl_ms / 2));
    const keys = seeds.map((h) => `${k}:alive:${h.deployment}`);
    const verdicts = await this.redis.mget(...keys);
    const silent = new Set<string>();
    await Promise.all(
      seeds.map(async (h, i) => {
        let v = verdicts[i];
        if (v === null && (await this.redis.set(keys[i]!, 'probing', 'PX', PROBE_MS, 'NX')) === 'OK') {
          v = (await answers(h)) ? '1' : '0';
          await this.redis.set(keys[i]!, v, 'PX', lasts);
        }
        if (v === '0') silent.add(h.deployment);
      }),
    );
    return { live: holders.filter((h) => !silent.has(h.deployment)), silent: holders.filter((h) => silent.has(h.deployment)) };
  }

  /** Every holder of `key` still listed; expired entries are dropped from Redis. */
  async holders(key: string, now = Date.now()): Promise<PeerHolder[]> {
    const k = this.groupKey(key);
    const all = await this.redis.hgetall(k);
    const live: PeerHolder[] = [];
    const expired: string[] = [];
    for (const [field, value] of Object.entries(all)) {
      let h: PeerHolder | null = null;
      try {
        h = JSON.parse(value) as PeerHolder;
      } catch {
        h = null;
      }
      if (!h || typeof h.until !== 'number' || h.until <= now) expired.push(field);
      else live.push(h);
    }
    if (expired.length > 0) await this.redis.hdel(k, ...expired);
    return live;
  }
}

/** Which peer an address names (its URL without trailing slashes, and its disk): what lists and reports are matched on. */
export function peerId(p: { url: string; disk: string }): string {
  return `${p.url.replace(/\/+$/, '')} ${p.disk}`;
}

/** Orders and caps the holders for one disk (pure: unit-tested). */
export function choosePeers(holders: readonly PeerHolder[], self: { deployment: string; url: string; disk: string; rack: string | null }, max: number): PeerAddress[] {
  const spread = (h: PeerHolder): number => createHash('sha256').update(`${self.deployment}\n${h.deployment}`).digest().readUInt32BE(0);
  const sameRack = (h: PeerHolder): number => (self.rack !== null && h.rack === self.rack ? 1 : 0);
  const fraction = (h: PeerHolder): number => (h.total > 0 ? h.local / h.total : 0);
  const seen = new Set<string>([peerId(self)]);
  const out: PeerAddress[] = [];
  const ranked = holders
    .filter((h) => h.deployment !== self.deployment && PEER_URL.test(h.url))
    // Quarters, not exact fractions: disks copying at the same pace would otherwise all
    // name the one a poll saw a region ahead first.
    .map((h) => ({ h, rack: sameRack(h), complete: h.complete ? 1 : 0, quarter: Math.floor(fraction(h) * 4), spread: spread(h) }))
    .sort((a, b) => b.rack - a.rack || b.complete - a.complete || b.quarter - a.quarter || a.spread - b.spread);
  for (const { h } of ranked) {
    if (out.length >= max) break;
    const id = peerId(h);
    if (seen.has(id)) continue;
    seen.add(id);
    out.push({ url: h.url.replace(/\/+$/, ''), disk: h.disk });
  }
  return out;
}

/** A stable digest of a peer list, to tell whether the agent has the latest one. */
export function peerListDigest(peers: readonly PeerAddress[]): string {
  return createHash('sha256').update(peers.map((p) => `${p.url} ${p.disk}`).join('\n')).digest('hex').slice(0, 16);
}

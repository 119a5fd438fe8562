/**
 * Boot profiles in the driver: which regions an image's hosts read first while booting,
 * learned from the agents' recordings (dpu-agent/src/streaming/boot-profile.ts), kept per
 * image content beside its manifest, and handed to the next disk of the image, whose
 * hydrator copies those regions first, in boot order, from the moment it is created.
 *
 *   key      the image's manifest key (manifests.ts manifestKey): format, region size and
 *            content digest (or identity). Region numbers only mean something for one
 *            region size and one content, and the key says both. An image with nothing
 *            naming its content gets no profile.
 *   Redis    `<prefix>:boot-profile:<sha256 of key>` a list, newest first, of the image's
 *            last `history` recorded boots, one JSON entry each ({boot, node, key,
 *            region_size, recorded_at, regions}): LPUSH and LTRIM in one MULTI, so two
 *            deployments finishing at once both land and nothing grows past `history`;
 *            the key expires `ttl_days` after the last boot stored.
 *            `<prefix>:boot-profiles` the set of those hashes, for listing (a member whose
 *            list expired is dropped when listed).
 *            Memory: at most `history` × `max_regions` regions per image, ~6 bytes each in
 *            JSON (5 × 4096 × 6 ≈ 120 KiB), for the images deployed within `ttl_days`.
 *   merge    computed when read (mergeBoots): a region is kept when at least
 *            ceil(min_share × boots) of the kept boots read it (at least one), ordered by
 *            the mean of its rank in the boots that read it (a rank is the position of the
 *            region in that boot scaled to 0..1, so a long boot and a short one weigh
 *            alike), ties by how many boots read it, then by region; at most `max_regions`.
 *            Storing the boots, not only their merge, lets the rule change without losing
 *            history, and the oldest boot age out by itself.
 *
 * A boot is identified by node, deployment and the record's creation: the monitor job
 * may store one twice if it dies between the push and the record's update; the merge
 * counts each boot once.
 */
import { createHash } from 'node:crypto';
import type { Redis } from 'ioredis';
import type { DriverConfig } from './config.js';

export interface RecordedBoot {
  /** `<node>/<deployment>/<record created_at>`. */
  boot: string;
  node: string;
  key: string;
  region_size: number;
  recorded_at: string;
  regions: number[];
}

export interface ProfileSummary {
  id: string;
  key: string;
  region_size: number;
  /** Boots merged (distinct). */
  boots: number;
  /** Regions of the merged profile. */
  regions: number;
  updated_at: string;
}

export interface MergedProfile extends ProfileSummary {
  merged: number[];
  history: { boot: string; node: string; recorded_at: string; regions: number }[];
}

/** The profile's id in the API and in Redis: the first 32 hex digits of the key's SHA-256. */
export function profileId(key: string): string {
  return createHash('sha256').update(key).digest('hex').slice(0, 32);
}

/** The merge rule (see the top of this file); `boots` newest first or in any order. */
export function mergeBoots(boots: readonly (readonly number[])[], opts: { minShare: number; maxRegions: number }): number[] {
  if (boots.length === 0) return [];
  const need = Math.max(1, Math.ceil(opts.minShare * boots.length - 1e-9));
  const count = new Map<number, number>();
  const rankSum = new Map<number, number>();
  for (const regions of boots) {
    const span = Math.max(1, regions.length - 1);
    const seen = new Set<number>();
    regions.forEach((r, i) => {
      if (seen.has(r)) return;
      seen.add(r);
      count.set(r, (count.get(r) ?? 0) + 1);
      rankSum.set(r, (rankSum.get(r) ?? 0) + i / span);
    });
  }
  const kept = [...count.entries()].filter(([, n]) => n >= need).map(([r, n]) => ({ r, n, rank: rankSum.get(r)! / n }));
  kept.sort((a, b) => a.rank - b.rank || b.n - a.n || a.r - b.r);
  return kept.slice(0, opts.maxRegions).map((k) => k.r);
}

export class BootProfileStore {
  constructor(
    private readonly redis: Redis,
    private readonly prefix: string,
    private readonly cfg: DriverConfig['boot_profiles'],
  ) {}

  private listKey(id: string): string {
    return `${this.prefix}:boot-profile:${id}`;
  }

  private get setKey(): string {
    return `${this.prefix}:boot-profiles`;
  }

  /** Stores one recorded boot of the image `boot.key` (trimmed to max_regions), keeping the last `history`. */
  async push(boot: RecordedBoot): Promise<void> {
    const id = profileId(boot.key);
    const entry: RecordedBoot = { ...boot, regions: boot.regions.slice(0, this.cfg.max_regions) };
    await this.redis
      .multi()
      .lpush(this.listKey(id), JSON.stringify(entry))
      .ltrim(this.listKey(id), 0, this.cfg.history - 1)
      .expire(this.listKey(id), this.cfg.ttl_days * 86_400)
      .sadd(this.setKey, id)
      .exec();
  }

  /** The merged profile of the image `key`, or null when none of its boots is stored. */
  async forKey(key: string): Promise<MergedProfile | null> {
    const p = await this.get(profileId(key));
    return p && p.key === key ? p : null;
  }

  async get(id: string): Promise<MergedProfile | null> {
    const raw = await this.redis.lrange(this.listKey(id), 0, -1);
    const boots: RecordedBoot[] = [];
    const seen = new Set<string>();
    for (const text of raw) {
      let b: RecordedBoot;
      try {
        b = JSON.parse(text) as RecordedBoot;
      } catch {
        continue; // not ours: skipped, aged out by LTRIM
      }
      // Valid JSON that is not a boot record (null, a number, another shape): skipped too.
      if (typeof b !== 'object' || b === null || typeof b.boot !== 'string' || typeof b.key !== 'string' || seen.has(b.boot) || !Array.isArray(b.regions)) continue;
      seen.add(b.boot);
      boots.push(b);
    }
    const newest = boots[0];
    if (!newest) return null;
    // Every entry is of one key (the hash says so); one of another region size would be a bug: left out.
    const same = boots.filter((b) => b.key === newest.key && b.region_size === newest.region_size);
    const merged = mergeBoots(
      same.map((b) => b.regions),
      { minShare: this.cfg.min_share, maxRegions: this.cfg.max_regions },
    );
    return {
      id,
      key: newest.key,
      region_size: newest.region_size,
      boots: same.length,
      regions: merged.length,
      updated_at: newest.recorded_at,
      merged,
      history: same.map((b) => ({ boot: b.boot, node: b.node, recorded_at: b.recorded_at, regions: b.regions.length })),
    };
  }

  async list(): Promise<ProfileSummary[]> {
    const ids = (await this.redis.smembers(this.setKey)).sort();
    const out: ProfileSummary[] = [];
    for (const id of ids) {
      const p = await this.get(id);
      if (!p) {
        await this.redis.srem(this.setKey, id); // expired
        continue;
      }
      const { merged: _m, history: _h, ...summary } = p;
      out.push(summary);
    }
    return out;
  }

  async count(): Promise<number> {
    return this.redis.scard(this.setKey);
  }

  /** Forgets the image's boots; false when there were none. */
  async delete(id: string): Promise<boolean> {
    const [[, n]] = (await this.redis.multi().del(this.listKey(id)).srem(this.setKey, id).exec()) as [[Error | null, number], unknown];
    return n > 0;
  }
}

/**
 * Deployment records in Redis: one hash per node (`<prefix>:deployment:<node>`) and a set
 * of nodes. A node has at most one deployment; creating is atomic (a Lua script), so two
 * driver processes racing on one request agree on one record. Updates set single fields,
 * so the attach, monitor and teardown workers never overwrite each other's fields.
 *
 * The create request (`spec`) is kept whole because workers on any process need it; it
 * holds the agent token and the image URL with its signature, so it is never returned by
 * the API and never logged.
 */
import type { Redis } from 'ioredis';
import type { DeploymentCreate } from '../../openapi/clients/driver-client.js';

export type DeploymentState = 'attaching' | 'ready' | 'complete' | 'failed' | 'deleting';

export interface Progress {
  regions_total: number;
  regions_local: number;
  bytes_fetched: number;
  fetch_rate_bps: number;
  fraction: number;
}

export interface DeploymentRecord {
  node_uuid: string;
  deployment_id: string;
  state: DeploymentState;
  image_url: string; // redacted
  /** When image_url stops working (a Swift temp URL; the monitor job renews it before), ISO 8601; null when it does not expire. */
  image_expires_at: string | null;
  agent_url: string;
  disk_id: string;
  export_uri: string | null;
  progress: Progress;
  last_error: string | null;
  /** The cache key of the image's manifest (manifests.ts), once the attach job knows it; null when the image gets none. */
  manifest_key?: string | null;
  /** The image's profile key (manifests.ts manifestKey in the disk's region size). */
  profile_key?: string | null;
  boot_profile?: BootProfileRecord | null;
  /** Peer-to-peer regions (peers.ts); null when peers are off. */
  peers?: PeerRecord | null;
  created_at: string;
  updated_at: string;
  spec: DeploymentCreate;
}

/** What a deployment did with boot profiles (boot-profiles.ts); null when they are off or the image has no key. */
export interface BootProfileRecord {
  /** The image's profile id (also when none was stored yet: this deployment's boot goes there). */
  id: string;
  /** Regions of the profile replayed on the disk; 0 when none was (none stored, refused, or off on the agent). */
  applied: number;
  /** Boots the replayed profile was merged from. */
  boots: number;
  /** The agent's recording state, as last seen by the monitor job. */
  recording: string;
  /** This boot is stored in the image's profile. */
  collected: boolean;
  /** Why the profile was not replayed or the boot not collected, or null. */
  note: string | null;
}

/** What a deployment's disk does with peers (peers.ts), as last polled. */
export interface PeerRecord {
  /** The image's peer group (its manifest key); null when the image cannot take part (see note). */
  key: string | null;
  /** Peers in the disk's list. */
  sources: number;
  bytes_from_peers: number;
  bytes_served: number;
  /** It reads the origin without waiting for peers (one of the image's seeders). */
  seeder?: boolean;
  /** Until when the tracker lists this disk for others (ISO 8601). */
  listed_until: string | null;
  /** The last list sent to the agent ('complete' once the disk completed and no list is sent). */
  digest: string | null;
  note: string | null;
}

export const EMPTY_PROGRESS: Progress = { regions_total: 0, regions_local: 0, bytes_fetched: 0, fetch_rate_bps: 0, fraction: 0 };

// KEYS[1] record, KEYS[2] node set; ARGV[1] node, ARGV[2..] field/value pairs.
// Returns 1 when created, else the existing deployment_id.
const CREATE_LUA = `
if redis.call('EXISTS', KEYS[1]) == 1 then
  return redis.call('HGET', KEYS[1], 'deployment_id')
end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('SADD', KEYS[2], ARGV[1])
return 1
`;

// Only updates a record that still belongs to the given deployment (a teardown and a
// new deployment of the node must not be confused with a late worker of the old one).
// KEYS[1] record; ARGV[1] deployment_id; ARGV[2..] field/value pairs. Returns 1 or 0.
// Once a record is `deleting`, only the teardown may change it (ARGV[2] == '1'): a late
// attach or monitor step must not turn a deployment being torn down back into
// `failed`/`complete`. KEYS[1] record; ARGV[1] deployment_id; ARGV[2] teardown flag;
// ARGV[3..] field/value pairs.
const UPDATE_LUA = `
if redis.call('HGET', KEYS[1], 'deployment_id') ~= ARGV[1] then return 0 end
if ARGV[2] ~= '1' and redis.call('HGET', KEYS[1], 'state') == 'deleting' then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
return 1
`;

export class DeploymentStore {
  constructor(
    private readonly redis: Redis,
    private readonly prefix: string,
  ) {}

  private key(node: string): string {
    return `${this.prefix}:deployment:${node}`;
  }

  private get setKey(): string {
    return `${this.prefix}:deployments`;
  }

  /** Creates the record; returns null when created, else the existing record. */
  async createIfAbsent(rec: DeploymentRecord): Promise<DeploymentRecord | null> {
    const fields = encode(rec);
    const res = await this.redis.eval(CREATE_LUA, 2, this.key(rec.node_uuid), this.setKey, rec.node_uuid, ...fields);
    if (res === 1) return null;
    return this.get(rec.node_uuid);
  }

  async get(node: string): Promise<DeploymentRecord | null> {
    const h = await this.redis.hgetall(this.key(node));
    return h['deployment_id'] ? decode(h) : null;
  }

  async list(): Promise<DeploymentRecord[]> {
    const nodes = await this.redis.smembers(this.setKey);
    const recs = await Promise.all(nodes.sort().map((n) => this.get(n)));
    return recs.filter((r): r is DeploymentRecord => r !== null);
  }

  /** Sets fields of the node's record if it still is `deploymentId`; false if it is not. */
  /**
   * Sets fields of the node's record if it still is `deploymentId` and — unless
   * `teardown` — is not being deleted; false when nothing was changed.
   */
  async update(node: string, deploymentId: string, fields: Partial<Omit<DeploymentRecord, 'node_uuid' | 'deployment_id'>>, opts: { teardown?: boolean } = {}): Promise<boolean> {
    const flat = encode({ ...fields, updated_at: new Date().toISOString() });
    const res = await this.redis.eval(UPDATE_LUA, 1, this.key(node), deploymentId, opts.teardown ? '1' : '0', ...flat);
    return res === 1;
  }

  /** Removes the record if it still is `deploymentId`. */
  async remove(node: string, deploymentId: string): Promise<void> {
    const key = this.key(node);
    const cur = await this.redis.hget(key, 'deployment_id');
    if (cur !== deploymentId) return;
    await this.redis.multi().del(key).srem(this.setKey, node).exec();
  }
}

/** Fields stored as plain strings (the Lua scripts compare deployment_id as is); the rest as JSON. */
const PLAIN = new Set(['node_uuid', 'deployment_id', 'state', 'image_url', 'agent_url', 'disk_id', 'created_at', 'updated_at']);

function encode(o: Partial<DeploymentRecord>): string[] {
  const out: string[] = [];
  for (const [k, v] of Object.entries(o)) {
    if (v === undefined) continue;
    out.push(k, PLAIN.has(k) ? String(v) : JSON.stringify(v));
  }
  return out;
}

function decode(h: Record<string, string>): DeploymentRecord {
  const json = <T>(k: string, fallback: T): T => (h[k] === undefined ? fallback : (JSON.parse(h[k]) as T));
  return {
    node_uuid: h['node_uuid']!,
    deployment_id: h['deployment_id']!,
    state: h['state'] as DeploymentState,
    image_url: h['image_url'] ?? '',
    image_expires_at: json<string | null>('image_expires_at', null),
    agent_url: h['agent_url'] ?? '',
    disk_id: h['disk_id'] ?? '',
    export_uri: json<string | null>('export_uri', null),
    progress: json<Progress>('progress', EMPTY_PROGRESS),
    last_error: json<string | null>('last_error', null),
    manifest_key: json<string | null>('manifest_key', null),
    profile_key: json<string | null>('profile_key', null),
    boot_profile: json<BootProfileRecord | null>('boot_profile', null),
    peers: json<PeerRecord | null>('peers', null),
    created_at: h['created_at'] ?? '',
    updated_at: h['updated_at'] ?? '',
    spec: json<DeploymentCreate>('spec', {} as DeploymentCreate),
  };
}

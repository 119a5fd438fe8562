/**
 * Cleanings: Ironic's clean steps `erase_devices_metadata` and `erase_devices` for a node
 * whose disk is its DPU's target, done by the DPU agent (POST /v1/erasures) and followed by
 * a `clean` job (jobs.ts). One record per node in Redis (`<prefix>:cleaning:<node>`),
 * replaced by the node's next cleaning, so `GET /v1/nodes/{node}/cleaning` always shows
 * the last one.
 *
 *   queued ──► running ──► done
 *      │          ├──────► failed      (the agent's error, or retries exhausted)
 *      └──────────┴──────► cancelled   (DELETE /v1/nodes/{node}/cleaning: Ironic aborted
 *                                       or tore down the step)
 *
 * A finished record (done, failed, cancelled) never changes again: updates name the
 * cleaning they belong to and are refused once it has finished (a Lua script checks both),
 * so a late poll cannot turn a cancelled cleaning back into a running one, nor write into
 * the node's next cleaning. The request's driver_info (with the agent token) is kept for
 * the job and never returned.
 */
import { randomBytes } from 'node:crypto';
import type { Redis } from 'ioredis';
import type { components } from '../../openapi/generated/driver.js';

export type CleaningView = components['schemas']['Cleaning'];
export type CleaningCreate = components['schemas']['CleaningCreate'];
export type CleaningStep = CleaningCreate['step'];
export type CleaningState = CleaningView['state'];
type DriverInfo = components['schemas']['DriverInfo'];

/** The agent's erasure mode of each Ironic step. */
export const STEP_MODE: Record<CleaningStep, 'metadata' | 'full'> = { erase_devices_metadata: 'metadata', erase_devices: 'full' };
export const FINISHED: readonly CleaningState[] = ['done', 'failed', 'cancelled'];

export interface CleaningRecord extends Omit<CleaningView, 'jobs'> {
  driver_info: DriverInfo;
}

export function newCleaning(node: string, body: CleaningCreate): CleaningRecord {
  const now = new Date().toISOString();
  return {
    node_uuid: node,
    cleaning_id: `c-${Date.now()}-${randomBytes(3).toString('hex')}`,
    step: body.step,
    mode: STEP_MODE[body.step],
    state: 'queued',
    agent_url: body.driver_info.smartnic_agent_url.replace(/\/+$/, ''),
    target: body.driver_info.smartnic_target,
    erasure_id: null,
    method: null,
    bytes_done: 0,
    bytes_total: 0,
    fraction: 0,
    restarts: 0,
    started_at: null,
    finished_at: null,
    last_error: null,
    created_at: now,
    updated_at: now,
    driver_info: body.driver_info,
  };
}

// KEYS[1] record; ARGV[1..] field/value pairs of a new cleaning. A queued or running one
// stays (its cleaning_id is returned); anything else is replaced (1).
const CREATE_LUA = `
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'queued' or state == 'running' then
  return redis.call('HGET', KEYS[1], 'cleaning_id')
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
`;

// KEYS[1] record; ARGV[1] cleaning_id; ARGV[2..] field/value pairs. Only the cleaning
// named, and only while it has not finished. Returns 1 or 0.
const UPDATE_LUA = `
if redis.call('HGET', KEYS[1], 'cleaning_id') ~= ARGV[1] then return 0 end
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'done' or state == 'failed' or state == 'cancelled' then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
return 1
`;

/** Fields stored as plain strings (the scripts compare them); the rest as JSON. */
const PLAIN = new Set(['cleaning_id', 'state']);

export class CleaningStore {
  constructor(
    private readonly redis: Redis,
    private readonly prefix: string,
  ) {}

  private key(node: string): string {
    return `${this.prefix}:cleaning:${node}`;
  }

  /** Stores a new cleaning unless one is queued or running; returns null when stored, else that one. */
  async createIfIdle(rec: CleaningRecord): Promise<CleaningRecord | null> {
    const res = await this.redis.eval(CREATE_LUA, 1, this.key(rec.node_uuid), ...encode(rec));
    return res === 1 ? null : this.get(rec.node_uuid);
  }

  async get(node: string): Promise<CleaningRecord | null> {
    const h = await this.redis.hgetall(this.key(node));
    return h['cleaning_id'] ? decode(h) : null;
  }

  /** Sets fields of the node's cleaning `id` while it has not finished; false when nothing changed. */
  async update(node: string, id: string, fields: Partial<Omit<CleaningRecord, 'node_uuid' | 'cleaning_id' | 'driver_info'>>): Promise<boolean> {
    const res = await this.redis.eval(UPDATE_LUA, 1, this.key(node), id, ...encode({ ...fields, updated_at: new Date().toISOString() }));
    return res === 1;
  }
}

function encode(o: Partial<CleaningRecord>): string[] {
  const out: string[] = [];
  for (const [k, v] of Object.entries(o)) {
    if (v === undefined) continue;
    out.push(k, PLAIN.has(k) ? String(v) : JSON.stringify(v));
  }
  return out;
}

function decode(h: Record<string, string>): CleaningRecord {
  const out: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(h)) out[k] = PLAIN.has(k) ? v : JSON.parse(v);
  return out as unknown as CleaningRecord;
}

/** What the API shows of a record: everything but driver_info (it holds the agent token). */
export function cleaningView(rec: CleaningRecord, jobs: CleaningView['jobs']): CleaningView {
  const { driver_info: _secret, ...shown } = rec;
  return { ...shown, jobs };
}

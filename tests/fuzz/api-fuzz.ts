/**
 * Fuzzing of the two REST APIs against their OpenAPI documents (issue #8): the DPU agent's
 * management API (openapi/dpu-agent.yaml, buildAgentApi over a real DiskManager, origin and
 * temp targets) and the driver service's API (openapi/driver.yaml, buildDriverApi over a
 * real redis-server, no job workers), both driven in-process with fastify's inject().
 *
 * For every operation the generators come from the document: a valid-shaped request is
 * built from the operation's parameter and body schemas (enums, patterns, bounds), then
 * at most one defect is applied — a missing required field, a wrong type, an unknown
 * field, a string over its maxLength, a number out of bounds, a pattern or enum miss, an
 * empty object where one field is needed, an array where an object belongs; invalid JSON,
 * an empty body, a wrong Content-Type, an oversized body; a bad path parameter; a bad or
 * unknown query parameter; a missing, wrong or malformed Authorization header; a method
 * the path does not have; a path that does not exist.
 *
 * Properties, per request:
 *   - no 5xx for a defective request. A valid-shaped one may get a 5xx only where the
 *     document declares it for a dependency: 502 (agent createDisk: the origin is
 *     unreachable; driver getDeploymentRegions: the agent is unreachable) and 503 (driver
 *     health with Redis down);
 *   - every status ≥ 400 has an `Error` body (code with the service's prefix, a non-empty
 *     message, retryable boolean, field a string when present), and for the defect applied,
 *     the status is the one it calls for (400, 401, 404, 413, 415) and the message names it
 *     (the dotted field, the unknown key, the parameter, "JSON", the token…);
 *   - every answer within 2 s (10 s for a valid-shaped agent request on a disk, which waits
 *     behind that disk's creation or deletion, and for validate);
 *   - statuses of valid-shaped requests that the document does not list are reported as
 *     notes (not failures);
 *   - after every chunk, GET /v1/health answers 200.
 *
 * Side effects are confined: image URLs point at a local TestOrigin or at a closed
 * loopback port, targets lie under the agent's allowed prefix in a temp directory (and the
 * fuzzer also tries paths outside it, then checks nothing was created there), TCP exports
 * are off, disk and node ids come from small pools so creations and deletions meet.
 *
 * Run outside CI:  node dist/tests/fuzz/api-fuzz.js --inputs 1000000 [--seed S]
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import fc from 'fast-check';
import type { FastifyInstance } from 'fastify';
import { pino } from 'pino';
import { buildAgentApi } from '../../dpu-agent/src/daemon/api.js';
import { parseAgentConfig } from '../../dpu-agent/src/daemon/config.js';
import { DiskManager } from '../../dpu-agent/src/daemon/disks.js';
import { buildDriverApi, type DriverApp } from '../../driver/src/api.js';
import { resolveDriverConfig } from '../../driver/src/config.js';
import { createMetrics } from '../../driver/src/metrics.js';
import { Queues } from '../../driver/src/queues.js';
import { connectRedis } from '../../driver/src/redis-connect.js';
import { DeploymentStore } from '../../driver/src/store.js';
import { deref, loadOpenApi, type OpenApiDocument } from '../../openapi/server.js';
import { makeImage } from '../helpers/agent.js';
import { TestOrigin } from '../helpers/origin.js';
import { freePort, RedisServer } from '../helpers/redis.js';
import type { FuzzFailure, FuzzReport } from './nbd-fuzz.js';

/* eslint-disable @typescript-eslint/no-explicit-any */
type Json = any;

const TOKEN = 'fuzz-token-0123456789abcdef';
const TIME_MS = 2000;
const SLOW_TIME_MS = 10_000;
/** The JSON body limits: fastify's default for the agent; the driver takes inline config drives (driver/src/api.ts). */
const BODY_LIMIT: Record<'agent' | 'driver', number> = { agent: 1 << 20, driver: 10 << 20 };
const METHODS = ['get', 'post', 'put', 'patch', 'delete'] as const;

// ---- the operations, read from the documents ------------------------------------------------

interface Param {
  name: string;
  in: 'path' | 'query';
  required: boolean;
  schema: Json;
}

interface Operation {
  api: 'agent' | 'driver';
  id: string;
  method: (typeof METHODS)[number];
  path: string;
  params: Param[];
  body: { kind: 'json'; schema: Json; required: boolean } | { kind: 'binary' } | null;
  secured: boolean;
  statuses: Set<number>;
}

function operations(api: 'agent' | 'driver', doc: OpenApiDocument): Operation[] {
  const ops: Operation[] = [];
  for (const [p, item] of Object.entries(doc.paths)) {
    const shared = (item['parameters'] as unknown as Json[] | undefined) ?? [];
    for (const method of METHODS) {
      const op = item[method] as Json;
      if (!op) continue;
      const params = [...shared, ...(op.parameters ?? [])].map((x) => deref(doc, x) as Json).map((x) => ({ name: x.name, in: x.in, required: !!x.required, schema: x.schema ?? {} }));
      const rb = op.requestBody ? (deref(doc, op.requestBody) as Json) : null;
      let body: Operation['body'] = null;
      if (rb?.content?.['application/json']) body = { kind: 'json', schema: deref(doc, rb.content['application/json'].schema), required: !!rb.required };
      else if (rb?.content?.['application/octet-stream']) body = { kind: 'binary' };
      const security = op.security ?? doc.security ?? [];
      ops.push({ api, id: op.operationId, method, path: p, params, body, secured: security.length > 0, statuses: new Set(Object.keys(op.responses ?? {}).map(Number)) });
    }
  }
  return ops;
}

// ---- valid-shaped values from schemas ---------------------------------------------------------

interface Env {
  /** A URL the origin serves, one it answers 404 for, one where nothing listens. */
  urls: string[];
  targets: string;
  escape: string;
  /** The methods the document has for a path. */
  methodsOf(p: string): string[];
  /** Every route the service has (the document's and a few of its own). */
  routes: RegExp[];
}

/** Fields whose values reach the network or the file system get harmless values. */
function override(key: string, env: Env): fc.Arbitrary<Json> | null {
  switch (key) {
    case 'smartnic_agent_url': // no agent listens: validate learns so at once (a GET of the image would cost 1 MiB)
      return fc.constantFrom(...env.urls.slice(1));
    case 'url':
    case 'image_source':
      return fc.oneof({ weight: 4, arbitrary: fc.constantFrom(...env.urls) }, { weight: 1, arbitrary: fc.constantFrom('glance://2f0a', '2b1a5e5a-47a3-4c4c-9d0a-000000000000', 'swift://glance/obj', 'ftp://x/y', 'not a url', 'http://') });
    case 'path': // agent target.path
    case 'smartnic_target':
      return fc.oneof(
        { weight: 4, arbitrary: fc.nat(3).map((i) => `${env.targets}fz-${i}.raw`) },
        { weight: 1, arbitrary: fc.constantFrom(`${env.targets}../escape.raw`, `${env.escape}/x.raw`, '/etc/passwd', '/dev/null', 'relative.raw', `${env.targets}sub/dir/y.raw`, `${env.targets}`) },
      );
    case 'host':
      return fc.constantFrom('127.0.0.1', '::1', 'not-an-address', '');
    // Small pools, so that creations, reads and deletions meet, and state stays bounded
    // (a million random ids would grow the lists every GET returns).
    case 'id':
      return fc.nat(5).map((i) => `fz-${i}`);
    case 'node_uuid':
      return fc.nat(7).map((i) => `node-${i}`);
    // A root disk of a few MiB (the fuzz image is 1 MiB): a huge one would cost the agent a huge region map.
    case 'size':
      return fc.integer({ min: 1, max: 64 }).map((n) => n << 20);
    case 'root_gb':
      return fc.nat(2);
    case 'region_size':
    case 'smartnic_region_size':
      return fc.oneof(fc.constantFrom(4096, 65536, 1 << 20), fc.integer({ min: 4096, max: 1 << 30 }));
    default:
      return null;
  }
}

function typeOf(schema: Json): string[] {
  if (Array.isArray(schema.type)) return schema.type;
  if (schema.type) return [schema.type];
  if (schema.properties) return ['object'];
  return [];
}

function validArb(schema: Json, key: string, env: Env): fc.Arbitrary<Json> {
  const o = override(key, env);
  // An override stays inside the schema: the defects below are what make a request malformed.
  // One the schema never admits (a peer agent's base URL is not an image URL) is not used:
  // filtering it would never end.
  const fits = (v: Json): boolean => typeof v !== 'string' || ((!schema.pattern || new RegExp(schema.pattern).test(v)) && v.length >= (schema.minLength ?? 0) && v.length <= (schema.maxLength ?? Infinity));
  if (o && fc.sample(o, { numRuns: 50, seed: 1 }).some(fits)) return o.filter(fits);
  if (schema.enum) return fc.constantFrom(...schema.enum);
  const t = typeOf(schema)[0];
  switch (t) {
    case 'object': {
      const props = schema.properties ?? {};
      const required: string[] = schema.required ?? [];
      if (Object.keys(props).length === 0 && schema.additionalProperties) {
        return fc.dictionary(fc.stringMatching(/^[A-Za-z][A-Za-z0-9-]{0,15}$/), validArb(schema.additionalProperties, '', env), { maxKeys: 3 });
      }
      const rec: Record<string, fc.Arbitrary<Json>> = {};
      for (const [k, s] of Object.entries(props)) rec[k] = validArb(s, k, env);
      const arb = fc.record(rec, { requiredKeys: required });
      return schema.minProperties ? arb.filter((v) => Object.keys(v).length >= schema.minProperties) : arb;
    }
    case 'string':
      if (schema.pattern) return fc.stringMatching(new RegExp(schema.pattern), { maxLength: Math.min(schema.maxLength ?? 40, 40) }).filter((s) => s.length >= (schema.minLength ?? 0) && s.length <= (schema.maxLength ?? Infinity));
      if (schema.format === 'date-time') return fc.date({ noInvalidDate: true }).map((d) => d.toISOString());
      return fc.string({ minLength: schema.minLength ?? 0, maxLength: Math.min(schema.maxLength ?? 30, 30) });
    case 'integer': {
      const min = schema.minimum ?? -(2 ** 31);
      const max = Math.min(schema.maximum ?? 2 ** 40, 2 ** 40);
      const step = schema.multipleOf as number | undefined;
      if (step) return fc.integer({ min: Math.ceil(min / step), max: Math.floor(max / step) }).map((n) => n * step);
      return fc.integer({ min, max });
    }
    case 'number':
      return fc.double({ min: schema.minimum ?? -1e9, max: schema.maximum ?? 1e9, noNaN: true });
    case 'boolean':
      return fc.boolean();
    case 'array':
      return fc.array(validArb(schema.items ?? {}, '', env), { maxLength: 3 });
    default:
      return fc.constant(null);
  }
}

// ---- defects ------------------------------------------------------------------------------

type Defect =
  | { kind: 'none' }
  | { kind: 'body'; how: 'drop-required' | 'wrong-type' | 'extra-field' | 'too-long' | 'out-of-range' | 'pattern' | 'enum' | 'empty-object' | 'array-for-object'; pick: number; alt: number }
  | { kind: 'raw-body'; how: 'invalid-json' | 'empty' | 'content-type' | 'oversize'; pick: number }
  | { kind: 'param'; value: string }
  | { kind: 'query'; how: 'bad-value' | 'unknown'; value: string }
  | { kind: 'auth'; header: string | null }
  | { kind: 'method'; pick: number }
  | { kind: 'route'; path: string };

const defectArb: fc.Arbitrary<Defect> = fc.oneof(
  { weight: 3, arbitrary: fc.constant({ kind: 'none' as const }) },
  {
    weight: 10,
    arbitrary: fc.record({
      kind: fc.constant('body' as const),
      how: fc.constantFrom('drop-required', 'wrong-type', 'extra-field', 'too-long', 'out-of-range', 'pattern', 'enum', 'empty-object', 'array-for-object') as fc.Arbitrary<Extract<Defect, { kind: 'body' }>['how']>,
      pick: fc.nat(),
      alt: fc.nat(),
    }),
  },
  { weight: 3, arbitrary: fc.record({ kind: fc.constant('raw-body' as const), how: fc.oneof({ weight: 8, arbitrary: fc.constantFrom('invalid-json', 'empty', 'content-type') }, { weight: 1, arbitrary: fc.constant('oversize') }) as fc.Arbitrary<'invalid-json' | 'empty' | 'content-type' | 'oversize'> /* a 1 MiB body costs ms */, pick: fc.nat() }) },
  { weight: 2, arbitrary: fc.record({ kind: fc.constant('param' as const), value: fc.oneof(fc.constantFrom('UPPER', 'a'.repeat(200), '..', '%2e%2e', 'a%2Fb', '%00', '%20', '-lead', '%C3%A9', '%ZZ', '.', '_x', "a'b", 'a%22b'), fc.string({ maxLength: 12 }).map(encodeURIComponent)) }) },
  { weight: 2, arbitrary: fc.record({ kind: fc.constant('query' as const), how: fc.constantFrom('bad-value', 'unknown') as fc.Arbitrary<'bad-value' | 'unknown'>, value: fc.oneof(fc.constantFrom('maybe', '2', '', 'TRUE1', '[]', '%00'), fc.string({ maxLength: 8 }).map(encodeURIComponent)) }) },
  { weight: 2, arbitrary: fc.record({ kind: fc.constant('auth' as const), header: fc.constantFrom(null, 'Bearer wrong-token-wrong-token', 'Bearer ', 'Bearer', `Bearer ${TOKEN}x`, `bearer${TOKEN}`, 'Basic Zm9vOmJhcg==', 'Basic !!!', `Token ${TOKEN}`, `Bearer ${'x'.repeat(8000)}`) }) },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant('method' as const), pick: fc.nat() }) },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant('route' as const), path: fc.oneof(fc.constantFrom('/', '/v1', '/v2/disks', '/v1/disks/', '/v1/disks/fz-0/unknown', '/v1//disks', '/%', '/v1/deployments/x/y/z', '/metrics/'), fc.webPath()) }) },
);

interface ApiInput {
  op: number;
  params: Record<string, Json>;
  query: Record<string, Json>;
  body: Json;
  defect: Defect;
}

/** Every node of a JSON body with its schema and dotted path. */
function nodes(value: Json, schema: Json, at: string[] = []): { at: string[]; value: Json; schema: Json; parent: Json; key: string | null }[] {
  const out: { at: string[]; value: Json; schema: Json; parent: Json; key: string | null }[] = [{ at, value, schema, parent: null, key: null }];
  if (value && typeof value === 'object' && !Array.isArray(value)) {
    for (const [k, v] of Object.entries(value)) {
      const s = schema.properties?.[k] ?? (typeof schema.additionalProperties === 'object' ? schema.additionalProperties : {});
      for (const n of nodes(v, s, [...at, k])) out.push(n.key === null ? { ...n, parent: value, key: k } : n);
    }
  }
  return out;
}

interface Expectation {
  /** Acceptable statuses; null: any non-5xx (or a declared 5xx). */
  statuses: number[] | null;
  /** The message must match (when the status is an error). */
  message?: RegExp;
  what: string;
}

const esc = (s: string): string => s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');

/** Applies the defect to a clone of the body; returns null when it does not apply (the input is then valid-shaped). */
function breakBody(body: Json, schema: Json, d: Extract<Defect, { kind: 'body' }>): { body: Json; expect: Expectation } | null {
  const b = structuredClone(body);
  const all = nodes(b, schema);
  const pickOf = <T>(xs: T[]): T | null => (xs.length ? xs[d.pick % xs.length]! : null);
  const dotted = (at: string[]): string => ['body', ...at].join('.');
  const names = (at: string[]): RegExp => new RegExp(esc(dotted(at)) + '(?![A-Za-z0-9_])');
  switch (d.how) {
    case 'drop-required': {
      const c = pickOf(all.filter((n) => n.value && typeof n.value === 'object' && !Array.isArray(n.value) && (n.schema.required ?? []).length));
      if (!c) return null;
      const k = c.schema.required[d.alt % c.schema.required.length];
      delete c.value[k];
      return { body: b, expect: { statuses: [400], message: new RegExp(`${esc(dotted(c.at))} is missing the required field "${esc(k)}"`), what: `${dotted(c.at)} without ${k}` } };
    }
    case 'wrong-type': {
      const c = pickOf(all.filter((n) => n.key !== null && typeOf(n.schema).length));
      if (!c) return null;
      const types = typeOf(c.schema);
      const candidates: Json[] = [123, 'str', true, null, [1], { a: 1 }, 1.5].filter((v) => {
        const t = v === null ? 'null' : Array.isArray(v) ? 'array' : typeof v === 'number' ? (Number.isInteger(v) ? 'integer' : 'number') : typeof v;
        return !types.includes(t) && !(t === 'integer' && types.includes('number'));
      });
      c.parent[c.key!] = candidates[d.alt % candidates.length];
      return { body: b, expect: { statuses: [400], message: names(c.at), what: `${dotted(c.at)} of the wrong type` } };
    }
    case 'extra-field': {
      const c = pickOf(all.filter((n) => n.value && typeof n.value === 'object' && !Array.isArray(n.value) && n.schema.additionalProperties === false));
      if (!c) return null;
      const k = ['extra', 'ID', '__proto_x', 'x'.repeat(300), 'état'][d.alt % 5]!;
      c.value[k] = d.alt;
      return { body: b, expect: { statuses: [400], message: new RegExp(`unknown field "${esc(k)}"`), what: `${dotted(c.at)} with unknown field ${k}` } };
    }
    case 'too-long': {
      const c = pickOf(all.filter((n) => n.key !== null && typeof n.value === 'string' && typeof n.schema.maxLength === 'number' && !n.schema.pattern));
      if (!c) return null;
      c.parent[c.key!] = 'h'.repeat(c.schema.maxLength + 1 + (d.alt % 100));
      return { body: b, expect: { statuses: [400], message: names(c.at), what: `${dotted(c.at)} over maxLength` } };
    }
    case 'out-of-range': {
      const c = pickOf(all.filter((n) => n.key !== null && typeOf(n.schema)[0] === 'integer'));
      if (!c) return null;
      const s = c.schema;
      // (1e300 is an integer to JSON Schema: out of range only under a maximum)
      const opts = [s.minimum !== undefined ? s.minimum - 1 : null, s.maximum !== undefined ? s.maximum + 1 : null, 2.5, s.maximum !== undefined ? 1e300 : null].filter((v) => v !== null);
      c.parent[c.key!] = opts[d.alt % opts.length];
      return { body: b, expect: { statuses: [400], message: names(c.at), what: `${dotted(c.at)} out of range` } };
    }
    case 'pattern': {
      const c = pickOf(all.filter((n) => n.key !== null && typeof n.value === 'string' && n.schema.pattern));
      if (!c) return null;
      const v = ['', 'UPPER CASE', '-x', 'file:///etc/passwd', 'a'.repeat(300), ' http://x'][d.alt % 6]!;
      if (new RegExp(c.schema.pattern).test(v) && v.length <= (c.schema.maxLength ?? Infinity) && v.length >= (c.schema.minLength ?? 0)) return null;
      c.parent[c.key!] = v;
      return { body: b, expect: { statuses: [400], message: names(c.at), what: `${dotted(c.at)} not matching its pattern` } };
    }
    case 'enum': {
      const c = pickOf(all.filter((n) => n.key !== null && n.schema.enum));
      if (!c) return null;
      c.parent[c.key!] = 'not-an-enum-value';
      return { body: b, expect: { statuses: [400], message: names(c.at), what: `${dotted(c.at)} outside its enum` } };
    }
    case 'empty-object': {
      if (!schema.minProperties) return null;
      return { body: {}, expect: { statuses: [400], message: /body must NOT have fewer than/, what: 'an empty object' } };
    }
    case 'array-for-object': {
      const c = pickOf(all.filter((n) => n.value && typeof n.value === 'object' && !Array.isArray(n.value)));
      if (!c) return null;
      const arr = Array.from({ length: 1 + (d.alt % 2000) }, (_, i) => i);
      if (c.key === null) return { body: arr, expect: { statuses: [400], message: /body must be object/, what: 'an array body' } };
      c.parent[c.key] = arr;
      return { body: b, expect: { statuses: [400], message: names(c.at), what: `${dotted(c.at)} as an array` } };
    }
  }
}

interface BuiltRequest {
  method: string;
  url: string;
  headers: Record<string, string>;
  payload?: string | Buffer;
  expect: Expectation;
  /** Valid-shaped: declared 5xx statuses are tolerated, undocumented ones are notes. */
  validShaped: boolean;
  slow: boolean;
}

/** The path a URL resolves to (dot segments removed); the path itself when it does not parse. */
function urlPath(p: string): string {
  try {
    return new URL(p, 'http://h').pathname;
  } catch {
    return p;
  }
}

function build(op: Operation, input: ApiInput, env: Env): BuiltRequest {
  const d = input.defect;
  const headers: Record<string, string> = { authorization: `Bearer ${TOKEN}` };
  let pathStr = op.path.replace(/\{([^}]+)\}/g, (_, name: string) => encodeURIComponent(String(input.params[name])));
  const query = { ...input.query };
  let payload: string | Buffer | undefined;
  let expect: Expectation = { statuses: null, what: 'a valid-shaped request' };
  let validShaped = true;
  let method = op.method.toUpperCase();
  if (op.body?.kind === 'json') {
    headers['content-type'] = 'application/json';
    payload = JSON.stringify(input.body);
  } else if (op.body?.kind === 'binary') {
    headers['content-type'] = 'application/octet-stream';
    payload = Buffer.from(input.body as Uint8Array);
  }
  const defective = (e: Expectation): void => {
    expect = e;
    validShaped = false;
  };
  switch (d.kind) {
    case 'none':
      break;
    case 'body':
      if (op.body?.kind === 'json') {
        const broken = breakBody(input.body, op.body.schema, d);
        if (broken) {
          payload = JSON.stringify(broken.body);
          defective(broken.expect);
        }
      }
      break;
    case 'raw-body':
      if (!op.body) break; // a GET ignores what it is sent; still must not fail
      if (d.how === 'invalid-json' && op.body.kind === 'json') {
        const text = JSON.stringify(input.body);
        payload = ['{', '{"id":', text.slice(0, Math.max(1, d.pick % text.length)), `${text}}`, "{'a':1}", '[1,]', 'nul', '\u0000', '{"a":1}{"b":2}'][d.pick % 9]!;
        defective({ statuses: [400], message: /JSON|json|Unexpected|Body/, what: 'invalid JSON' });
      } else if (d.how === 'empty') {
        payload = '';
        // A manifest is checked by the handler, after the disk is looked up.
        defective(op.body.kind === 'json' ? { statuses: [400], message: /body|Body/, what: 'an empty body' } : { statuses: [400, 404], what: 'an empty body' });
      } else if (d.how === 'content-type') {
        const ct = ['text/plain', 'application/xml', 'application/x-www-form-urlencoded', 'multipart/form-data; boundary=x', 'application/jsonx', 'image/png', 'application/json'][d.pick % 7]!;
        if (ct === headers['content-type']) break;
        headers['content-type'] = ct;
        if (op.body.kind === 'json' || ct !== 'application/json') defective({ statuses: [415, 400], message: /[Mm]edia [Tt]ype|content-type|Content-Type|body must be object/, what: `Content-Type ${ct}` }); // text/plain parses as a string
        else defective({ statuses: [400, 404], what: `Content-Type ${ct}` });
      } else if (d.how === 'oversize' && op.body.kind === 'json') {
        payload = JSON.stringify({ ...input.body, pad: 'p'.repeat(BODY_LIMIT[op.api] + (d.pick % 1000)) });
        defective({ statuses: [413], message: /too large|[Ll]arge/, what: 'an oversized body' });
      }
      break;
    case 'param': {
      const p = op.params.find((x) => x.in === 'path');
      if (!p) break;
      pathStr = op.path.replace(/\{([^}]+)\}/g, d.value);
      const raw = (() => {
        try {
          return decodeURIComponent(d.value);
        } catch {
          return null;
        }
      })();
      if (raw !== null && !raw.includes('/') && new RegExp(p.schema.pattern ?? '.*').test(raw) && raw !== '.' && raw !== '..') break; // still valid
      defective({ statuses: [400, 404], message: new RegExp(`${p.name}|not a valid url|no (endpoint|route)|[Nn]ot [Ff]ound|no such|has no deployment|no disk`), what: `path parameter ${p.name}=${d.value}` });
      break;
    }
    case 'query': {
      const q = op.params.find((x) => x.in === 'query');
      if (d.how === 'unknown') {
        query['unknown_param'] = d.value;
        if (q) defective({ statuses: [400], message: /unknown field "unknown_param"/, what: 'an unknown query parameter' });
      } else if (q) {
        const v = decodeURIComponent(d.value);
        if (['true', 'false', '1', '0', ''].includes(v)) break; // coerced to a boolean: valid
        query[q.name] = v;
        defective({ statuses: [400], message: new RegExp(q.name), what: `query ${q.name}=${d.value}` });
      }
      break;
    }
    case 'auth':
      if (d.header === null) delete headers['authorization'];
      else headers['authorization'] = d.header;
      if (op.secured) defective({ statuses: [401], message: /token|Authorization/, what: `Authorization: ${d.header?.slice(0, 40) ?? '(none)'}` });
      break;
    case 'method': {
      const others = METHODS.filter((m) => m !== op.method);
      method = others[d.pick % others.length]!.toUpperCase();
      if (env.methodsOf(op.path).includes(method.toLowerCase())) {
        method = op.method.toUpperCase();
        break;
      }
      defective({ statuses: [404, 405], message: /no (endpoint|route)|[Nn]ot [Ff]ound|[Mm]ethod/, what: `${method} ${op.path}` });
      break;
    }
    case 'route':
      pathStr = d.path.startsWith('/') ? d.path : `/${d.path}`;
      // The server resolves dot segments as a URL does ("/." is "/"), so compare with that.
      if (env.routes.some((r) => r.test(pathStr.split('?')[0]!) || r.test(urlPath(pathStr)))) {
        pathStr = op.path.replace(/\{([^}]+)\}/g, (_, name: string) => encodeURIComponent(String(input.params[name])));
        break;
      }
      defective({ statuses: [404, 400], message: /no (endpoint|route)|[Nn]ot [Ff]ound|not a valid url|no such|has no deployment|no disk/, what: `route ${pathStr}` });
      break;
  }
  const qs = Object.entries(query)
    .map(([k, v]) => `${encodeURIComponent(k)}=${encodeURIComponent(String(v))}`)
    .join('&');
  return { method, url: pathStr + (qs ? `?${qs}` : ''), headers, ...(payload !== undefined && method !== 'GET' ? { payload } : {}), expect, validShaped, // An agent request on a disk waits for the operations on that disk before it (the
    // manager serialises them): behind a creation or deletion it may take seconds.
    slow: op.id === 'validate' || (op.api === 'agent' && (op.id === 'createDisk' || op.params.some((p) => p.in === 'path'))) };
}

function inputArb(ops: Operation[], env: Env): fc.Arbitrary<ApiInput> {
  return fc.oneof(
    ...ops.map((op, i) => {
      const paramsRec: Record<string, fc.Arbitrary<Json>> = {};
      const queryRec: Record<string, fc.Arbitrary<Json>> = {};
      for (const p of op.params) (p.in === 'path' ? paramsRec : queryRec)[p.name] = validArb(p.schema, p.name, env);
      const body = op.body?.kind === 'json' ? validArb(op.body.schema, '', env) : op.body?.kind === 'binary' ? fc.uint8Array({ maxLength: 200 }) : fc.constant(null);
      const weight = op.id === 'createDisk' || op.id === 'createDeployment' || op.id === 'validate' ? 4 : op.body ? 3 : 1;
      return {
        weight,
        arbitrary: fc.record({ op: fc.constant(i), params: fc.record(paramsRec), query: fc.record(queryRec, { requiredKeys: [] }), body, defect: defectArb }),
      };
    }),
  );
}

// ---- the services ----------------------------------------------------------------------------

interface Services {
  agent: FastifyInstance;
  driver: DriverApp;
  env: Record<'agent' | 'driver', Env>;
  ops: Operation[];
  dir: string;
  escape: string;
  close(): Promise<void>;
}

async function setUp(): Promise<Services> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'api-fuzz-'));
  const image = path.join(dir, 'image.raw');
  makeImage(image, 1 << 20, 3);
  const origin = new TestOrigin({ file: image });
  const originUrl = await origin.start();
  const dead = await freePort(); // nothing listens there once freePort returns
  const urls = [originUrl, `${originUrl.replace(/\/[^/]*$/, '')}/missing.raw`, `http://127.0.0.1:${dead}/image.raw`];
  const targets = path.join(dir, 'agent', 'targets') + '/';
  const escape = path.join(dir, 'outside');
  fs.mkdirSync(targets, { recursive: true });
  const log = pino({ level: 'silent' });
  const agentConfig = parseAgentConfig(
    {
      auth: { tokens: [TOKEN] },
      state_dir: path.join(dir, 'agent', 'state'),
      export_dir: path.join(dir, 'agent', 'run'),
      allowed_targets: [targets],
      reopen_interval_ms: 60_000,
      defaults: { commit_interval_ms: 1000, open_timeout_ms: 1000 },
      log_level: 'silent',
    },
    'api fuzz config',
  );
  const manager = new DiskManager({ config: agentConfig, log });
  await manager.start();
  const agent = buildAgentApi({ config: agentConfig, manager, log, responseValidation: 'strict' });
  await agent.ready();

  const redisServer = new RedisServer(path.join(dir, 'redis'));
  await redisServer.start();
  const driverConfig = resolveDriverConfig({
    object: {
      auth: { tokens: [TOKEN] },
      redis: { url: redisServer.url, prefix: 'fuzz' },
      agent: { timeout_ms: 500 },
      glance: { timeout_ms: 500 },
      bull_board: { enabled: false },
      log_level: 'silent',
      response_validation: 'strict',
    },
  });
  const redis = connectRedis(driverConfig.redis, 'fail-fast');
  redis.on('error', () => undefined);
  if (redis.status !== 'ready') await new Promise((resolve) => redis.once('ready', resolve));
  const queues = new Queues(redis, 'fuzz', driverConfig.jobs, driverConfig.manifests.attempts);
  const store = new DeploymentStore(redis, 'fuzz');
  const driver = await buildDriverApi({ config: driverConfig, store, queues, redis, metrics: createMetrics(store, queues), log, version: '0.0.0' });
  await driver.ready();

  const agentDoc = loadOpenApi(new URL('../../../openapi/dpu-agent.yaml', import.meta.url));
  const driverDoc = loadOpenApi(new URL('../../../openapi/driver.yaml', import.meta.url));
  const ops = [...operations('agent', agentDoc), ...operations('driver', driverDoc)];
  const envFor = (api: 'agent' | 'driver'): Env => {
    const mine = ops.filter((o) => o.api === api);
    const extra = api === 'driver' ? ['/dashboard/', '/dashboard/app.js', '/dashboard', '/'] : [];
    return {
      urls,
      targets,
      escape,
      methodsOf: (p) => mine.filter((o) => o.path === p).map((o) => o.method),
      routes: [...mine.map((o) => new RegExp(`^${o.path.replace(/\{[^}]+\}/g, '[^/]*')}$`)), ...extra.map((e) => new RegExp(`^${esc(e)}$`))],
    };
  };
  return {
    agent,
    driver,
    ops,
    dir,
    escape,
    env: { agent: envFor('agent'), driver: envFor('driver') },
    async close() {
      await agent.close();
      await manager.close();
      await driver.close();
      await queues.close().catch(() => undefined);
      redis.disconnect();
      await redisServer.stop();
      await origin.stop();
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}

class Violation extends Error {}
function check(cond: unknown, what: string): asserts cond {
  if (!cond) throw new Violation(what);
}

async function send(s: Services, op: Operation, input: ApiInput, notes: Map<string, number>, slowBoundMs: number): Promise<void> {
  const req = build(op, input, s.env[op.api]);
  const app: { inject: FastifyInstance['inject'] } = op.api === 'agent' ? s.agent : (s.driver as unknown as FastifyInstance);
  const limit = req.slow && req.validShaped ? slowBoundMs : TIME_MS;
  let timer: NodeJS.Timeout | undefined;
  const started = Date.now();
  const answer = app.inject({ method: req.method as 'GET', url: req.url, headers: req.headers, ...(req.payload !== undefined ? { payload: req.payload } : {}) });
  const res = await Promise.race([answer, new Promise<null>((resolve) => (timer = setTimeout(() => resolve(null), limit)))]).finally(() => clearTimeout(timer));
  if (!res) {
    // Over the bound: say whether it was slow or stuck (waits up to a minute more).
    const late = await Promise.race([answer.then(() => Date.now() - started), new Promise<null>((resolve) => setTimeout(() => resolve(null), 60_000).unref())]);
    throw new Violation(`hang: no answer within ${limit} ms to ${req.method} ${req.url} (${req.expect.what}); ${late === null ? 'none after a further minute either' : `answered after ${late} ms`}`);
  }
  const ms = Date.now() - started;
  const status = res.statusCode;
  const label = `${op.api} ${req.method} ${req.url.slice(0, 120)} (${op.id}, ${req.expect.what}) → ${status}`;
  let body: Json = null;
  const ctype = String(res.headers['content-type'] ?? '');
  if (ctype.includes('application/json')) {
    try {
      body = JSON.parse(res.body);
    } catch {
      check(false, `${label}: the body is not JSON though it says so: ${res.body.slice(0, 200)}`);
    }
  }
  if (status >= 500) {
    const declared = req.validShaped && op.statuses.has(status) && (status === 502 || status === 503);
    check(declared, `${label}: a server error for ${req.validShaped ? 'a valid-shaped request (undeclared status)' : 'a malformed request'}: ${res.body.slice(0, 400)}`);
  }
  if (status >= 400 && op.id !== 'getHealth') {
    // (a 503 from the driver's health is its Health body, as documented)
    check(body && typeof body === 'object', `${label}: the error body is not a JSON object: ${res.body.slice(0, 200)}`);
    const prefix = op.api === 'agent' ? 'DPU_ERR_' : 'DRV_ERR_';
    check(typeof body.code === 'string' && (body.code.startsWith(prefix) || (op.api === 'driver' && body.code.startsWith('DPU_ERR_'))), `${label}: error code ${JSON.stringify(body.code)} is not a ${prefix}* code`);
    check(typeof body.message === 'string' && body.message.trim().length > 0, `${label}: the error has no message`);
    check(typeof body.retryable === 'boolean', `${label}: retryable is not a boolean`);
    check(body.field === undefined || typeof body.field === 'string', `${label}: field is not a string`);
  }
  if (req.expect.statuses) {
    check(req.expect.statuses.includes(status), `${label}: expected ${req.expect.statuses.join(' or ')}; body ${res.body.slice(0, 300)}`);
    if (req.expect.message && status >= 400) check(req.expect.message.test(body.message), `${label}: the message does not say what was wrong (wants ${req.expect.message}): ${JSON.stringify(body.message).slice(0, 300)}`);
  } else if (!op.statuses.has(status) && !(status === 401 && !op.secured)) {
    const key = `${op.api} ${op.id} → ${status} ${body?.code ?? ''}`.trim();
    notes.set(key, (notes.get(key) ?? 0) + 1);
  }
  check(ms <= limit, `${label}: answered after ${ms} ms`);
}

export interface ApiFuzzOptions {
  inputs: number;
  seed: number;
  /** Requests in flight at once. @default 16 */
  concurrency?: number;
  /**
   * Bound for valid-shaped agent requests on a disk, ms. @default 10000. Deleting a disk
   * whose origin has become unreachable takes the whole retry deadline (30 s; found by
   * this fuzzer, open): the CI sample raises the bound until that is fixed.
   */
  diskOpBoundMs?: number;
  log?: (line: string) => void;
}

export async function runApiFuzz(opts: ApiFuzzOptions): Promise<FuzzReport> {
  const say = opts.log ?? (() => undefined);
  const lanes = Math.max(1, opts.concurrency ?? 16);
  const s = await setUp();
  const failures: FuzzFailure[] = [];
  const notes = new Map<string, number>();
  const processErrors: string[] = [];
  const onUncaught = (err: unknown): void => void processErrors.push(`uncaught: ${(err as Error)?.stack ?? String(err)}`);
  process.on('uncaughtException', onUncaught);
  process.on('unhandledRejection', onUncaught);
  const started = Date.now();
  let inputs = 0;
  let stop = false;
  let owner: number | null = null;
  let shrinkDeadline = Infinity;
  let lastSay = Date.now();
  const CHUNK = 500;
  const perLane = Math.ceil(opts.inputs / lanes);
  const arbs = { all: fc.oneof(inputArb(s.ops.filter((o) => o.api === 'agent'), s.env.agent).map((i) => ({ ...i, api: 'agent' as const })), inputArb(s.ops.filter((o) => o.api === 'driver'), s.env.driver).map((i) => ({ ...i, api: 'driver' as const }))) };
  const agentOps = s.ops.filter((o) => o.api === 'agent');
  const driverOps = s.ops.filter((o) => o.api === 'driver');
  try {
    await Promise.all(
      Array.from({ length: lanes }, async (_, li) => {
        let done = 0;
        for (let chunk = 0; !stop && done < perLane; chunk++) {
          const seed = (opts.seed + li * 1_000_003 + chunk * 7919) | 0;
          const n = Math.min(CHUNK, perLane - done);
          const result = await fc.check(
            fc.asyncProperty(arbs.all, async (input) => {
              if (owner !== null && owner !== li) return;
              if (Date.now() > shrinkDeadline) return;
              const op = (input.api === 'agent' ? agentOps : driverOps)[input.op]!;
              try {
                inputs++;
                await send(s, op, input, notes, opts.diskOpBoundMs ?? SLOW_TIME_MS);
                if (processErrors.length) throw new Violation(processErrors.join('\n'));
              } catch (err) {
                if (owner === null) {
                  owner = li;
                  shrinkDeadline = Date.now() + 30_000;
                }
                throw err;
              }
            }),
            { numRuns: n, seed, verbose: 0 },
          );
          done += n;
          if (owner !== null && owner !== li) break;
          if (result.failed) {
            stop = true;
            const ce = result.counterexample?.[0] as (ApiInput & { api: 'agent' | 'driver' }) | undefined;
            let shown = '';
            if (ce) {
              try {
                const op = (ce.api === 'agent' ? agentOps : driverOps)[ce.op]!;
                const r = build(op, ce, s.env[ce.api]);
                const payload = r.payload === undefined ? '' : typeof r.payload === 'string' ? r.payload : `<${r.payload.length} bytes>`;
                shown = `${ce.api} ${r.method} ${r.url} headers=${JSON.stringify(r.headers).slice(0, 300)} body=${payload.slice(0, 600)}${payload.length > 600 ? `… (${payload.length} chars)` : ''}`;
              } catch (err) {
                shown = `${JSON.stringify(ce).slice(0, 2000)} (not rebuilt: ${(err as Error).message})`;
              }
            }
            failures.push({ message: `${(result.errorInstance as Error)?.message ?? 'failure'} (lane ${li}, chunk ${chunk}, fast-check seed ${seed}, path ${result.counterexamplePath})`, seed: opts.seed, ...(shown ? { counterexample: shown } : {}) });
            break;
          }
          // Still healthy: both services answer their health check.
          for (const [name, app] of [['agent', s.agent], ['driver', s.driver as unknown as FastifyInstance]] as const) {
            const h = await app.inject({ method: 'GET', url: '/v1/health' });
            if (h.statusCode !== 200) {
              stop = true;
              failures.push({ message: `after chunk ${chunk}: ${name} health answers ${h.statusCode}: ${h.body.slice(0, 200)}`, seed: opts.seed });
            }
          }
          if (li === 0 && Date.now() - lastSay > 10_000) {
            lastSay = Date.now();
            say(`api: ${inputs} inputs, ${Math.round(inputs / ((Date.now() - started) / 1000))}/s`);
          }
        }
      }),
    );
    // Nothing was created outside the allowed target prefix.
    const outside = [path.join(s.dir, 'agent', 'escape.raw'), s.escape];
    for (const o of outside) if (fs.existsSync(o)) failures.push({ message: `a target outside allowed_targets was created: ${o}`, seed: opts.seed });
  } finally {
    await s.close().catch((err: Error) => failures.push({ message: `teardown: ${err.message}`, seed: opts.seed }));
    process.off('uncaughtException', onUncaught);
    process.off('unhandledRejection', onUncaught);
  }
  const seconds = (Date.now() - started) / 1000;
  return {
    name: 'api',
    inputs,
    units: inputs,
    seconds,
    rate: inputs / seconds,
    failures,
    seed: opts.seed,
    notes: [...notes].sort((a, b) => b[1] - a[1]).map(([k, n]) => `undocumented status for a valid-shaped request: ${k} (${n}×)`),
  };
}

if (process.argv[1] && fileURLToPath(import.meta.url) === path.resolve(process.argv[1])) {
  const { printReport } = await import('./nbd-fuzz.js');
  const { values } = parseArgs({ options: { inputs: { type: 'string', default: '10000' }, seed: { type: 'string' }, concurrency: { type: 'string', default: '16' } } });
  const seed = values.seed !== undefined ? Number(values.seed) : Math.floor(Math.random() * 2 ** 31);
  const report = await runApiFuzz({ inputs: Number(values.inputs), seed, concurrency: Number(values.concurrency), log: (l) => console.log(l) });
  printReport(report);
  process.exit(report.failures.length ? 1 : 0);
}

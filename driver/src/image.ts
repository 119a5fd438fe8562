/**
 * Image resolution: what the DPU agent reads for a node's instance_info.image_source, which
 * is written as Ironic users write it:
 *
 *   http(s)://…                 any server that honours Range (as given; no renewal), unless
 *                               it is an unsigned object URL of the configured Swift account,
 *                               which is read like swift://
 *   <uuid>, glance://…/<uuid>   a Glance image (Ironic's parse_image_id: the last path
 *                               segment of a glance:// href must be a UUID)
 *   swift://container/object    an object of the configured Swift account
 *
 * Two steps. `parseImageSource` is synchronous and only looks at the string and the
 * config: createDeployment uses it to refuse a malformed source at once. `resolveImage`
 * asks Glance and Swift and produces the URL: Glance's /file download on the file store
 * (a single Range works there), a Swift temp URL built like Ironic's on the Swift store
 * and for Swift objects (see swift.ts). It runs in the attach job, whose retry policy
 * covers Glance or Swift being briefly away; a missing image fails at once. The monitor
 * job calls it again to renew a temp URL before it expires.
 *
 * The identity handed to the agent names the content, not the URL (`glance:<id>;sha512=…`,
 * `swift:/v1/AUTH_x/c/o;etag=…`), so a renewed URL resumes the same disk and a resume
 * can never mix two images.
 */
import http from 'node:http';
import https from 'node:https';
import axios from 'axios';
import { redactUrl } from '../../image-access/src/index.js';
import type { DeploymentCreate } from '../../openapi/clients/driver-client.js';
import type { DriverConfig } from './config.js';
import { DriverError } from './errors.js';
import { GlanceClient, type GlanceImage, storeOf } from './glance.js';
import { containerFor, objectOfUrl, type SwiftObject, tempUrl } from './swift.js';

export type InstanceInfo = DeploymentCreate['instance_info'];

/** What image_source names, before anything is asked. */
export type ImageRef = { kind: 'http'; url: string } | { kind: 'glance'; id: string } | ({ kind: 'swift' } & SwiftObject);

/** How the agent reads the bytes: raw as they are, qcow2 decoded into the disk it describes. */
export type AgentFormat = 'raw' | 'qcow2';

/** Glance disk_format values the agent can serve, and how. */
const DISK_FORMATS: Record<string, AgentFormat> = { raw: 'raw', qcow2: 'qcow2' };

export interface ResolvedImage {
  url: string;
  /** Request headers the agent must send (Glance's, for its /file URL). Never logged. */
  headers?: Record<string, string>;
  /** A stable name of the content, when one is known. */
  identity?: string;
  /** The digest Glance records of the bytes at the URL (os_hash_algo/value, else md5 checksum). */
  hash?: { algo: string; value: string };
  format: AgentFormat;
  /** Bytes at the URL, when the resolver learnt it (Glance's size, Swift's Content-Length). */
  size?: number;
  /** Unix seconds after which the URL stops working (a temp URL); absent when it does not expire. */
  expires?: number;
  /** How it was resolved, for logs. */
  via: 'http' | 'glance-file' | 'glance-swift' | 'swift';
}

const UUID = /^[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}$/i;

/** Canonical form of a UUID-like id (lower case, dashed), or null. */
function uuidOf(s: string): string | null {
  const t = s.replace(/^urn:uuid:|^uuid:/i, '').replace(/^\{(.*)\}$/, '$1');
  if (!UUID.test(t)) return null;
  const h = t.replace(/-/g, '').toLowerCase();
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

function sourceError(detail: string): DriverError {
  return new DriverError('DRV_ERR_IMAGE_SOURCE', detail, { field: 'instance_info.image_source' });
}

/** Classifies image_source; throws DRV_ERR_IMAGE_SOURCE for what can never work. */
export function parseImageSource(info: InstanceInfo, config: Readonly<DriverConfig>): ImageRef {
  const src = info.image_source.trim();
  const g = config.glance;
  const id = uuidOf(src);
  if (id) {
    if (!g.url) throw sourceError(`"${src}" is a Glance image id, but this service has no glance.url configured`);
    return { kind: 'glance', id };
  }
  let url: URL;
  try {
    url = new URL(src);
  } catch {
    throw sourceError(`"${redactUrl(src)}" is neither a URL, a Glance image id (UUID, or glance://UUID) nor swift://container/object`);
  }
  switch (url.protocol) {
    case 'glance:': {
      const last = src.split('/').pop() ?? '';
      const gid = uuidOf(last);
      if (!gid) throw sourceError(`"${src}" does not end in a Glance image id (a UUID): give glance://<uuid> or the bare UUID`);
      if (!g.url) throw sourceError(`"${src}" is a Glance image, but this service has no glance.url configured`);
      return { kind: 'glance', id: gid };
    }
    case 'swift:': {
      // swift://container/object: the container is the URL's host part, kept verbatim.
      const m = /^swift:\/\/([^/?#]+)\/([^?#]+)$/.exec(src);
      if (!m) throw sourceError(`"${src}" is not swift://container/object`);
      if (!g.swift_endpoint_url) throw sourceError(`"${src}" is a Swift object, but this service has no glance.swift_endpoint_url configured`);
      if (!g.swift_temp_url_key) throw sourceError(`"${src}" is a Swift object, but this service has no glance.swift_temp_url_key configured`);
      return { kind: 'swift', container: decodeURIComponent(m[1]!), object: m[2]!.split('/').map(decodeURIComponent).join('/') };
    }
    case 'http:':
    case 'https:': {
      const obj = g.swift_temp_url_key ? objectOfUrl(g, url) : null;
      return obj ? { kind: 'swift', ...obj } : { kind: 'http', url: src };
    }
    default:
      throw sourceError(`scheme "${url.protocol}" is not supported; give an http(s) URL, a Glance image id (UUID or glance://UUID) or swift://container/object`);
  }
}

/** What a deployment shows for its image before the attach job resolves it (no secrets). */
export function describeImageRef(ref: ImageRef): string {
  switch (ref.kind) {
    case 'http':
      return redactUrl(ref.url);
    case 'glance':
      return `glance://${ref.id}`;
    case 'swift':
      return `swift://${ref.container}/${ref.object}`;
  }
}

/** image_checksum's algorithm by the length of its hex value, as Ironic's checksum_utils.get_checksum_and_algo reads it. */
const CHECKSUM_LENGTHS: Record<number, string> = { 32: 'md5', 64: 'sha256', 128: 'sha512' };

/**
 * The digest instance_info gives of the image (Ironic copies Glance's into it), read as
 * Ironic reads it: image_os_hash_algo/value when given; else image_checksum, which names
 * its algorithm as `algo:value` or by its length: 32 hex digits md5 (the legacy meaning),
 * 64 sha256, 128 sha512. A checksum-file URL is refused: the service does not fetch
 * those (the Ironic plugin resolves them before it calls).
 */
export function infoDigest(info: InstanceInfo): { algo: string; value: string } | null {
  if (info.image_os_hash_value) return { algo: (info.image_os_hash_algo ?? 'sha512').toLowerCase(), value: info.image_os_hash_value };
  const checksum = info.image_checksum?.trim();
  if (!checksum) return null;
  if (/^https?:\/\//i.test(checksum)) {
    throw new DriverError('DRV_ERR_IMAGE_SOURCE', `instance_info.image_checksum is a URL (${redactUrl(checksum)}); this service does not fetch checksum files: give the checksum itself, or image_os_hash_algo and image_os_hash_value`, { field: 'instance_info.image_checksum' });
  }
  const named = /^([A-Za-z0-9_-]+):([0-9A-Fa-f]+)$/.exec(checksum);
  if (named) return { algo: named[1]!.toLowerCase(), value: named[2]! };
  return { algo: CHECKSUM_LENGTHS[checksum.length] ?? 'md5', value: checksum };
}

/** The content hash instance_info carries, as `algo=value`. */
function infoHash(info: InstanceInfo): string | undefined {
  const d = infoDigest(info);
  return d ? `${d.algo}=${d.value}` : undefined;
}

function formatOf(diskFormat: string | null | undefined, what: string): AgentFormat {
  const f = DISK_FORMATS[diskFormat ?? 'raw'];
  if (!f) throw sourceError(`${what} has disk_format "${diskFormat}"; the DPU serves ${Object.keys(DISK_FORMATS).join(' and ')} images`);
  return f;
}

const glanceClients = new WeakMap<object, GlanceClient>();

function glanceOf(config: Readonly<DriverConfig>): GlanceClient {
  let c = glanceClients.get(config.glance);
  if (!c) {
    c = new GlanceClient({ url: config.glance.url!, headers: { ...config.glance.headers }, timeout_ms: config.glance.timeout_ms });
    glanceClients.set(config.glance, c);
  }
  return c;
}

/** Resolves image_source to what the agent reads. Errors are DriverErrors whose `retryable` is the job policy. */
export async function resolveImage(info: InstanceInfo, config: Readonly<DriverConfig>, now: number = Date.now()): Promise<ResolvedImage> {
  const ref = parseImageSource(info, config);
  switch (ref.kind) {
    case 'http': {
      const hash = infoHash(info);
      return { url: ref.url, ...(hash ? { identity: `image;${hash}` } : {}), format: formatOf(info.image_disk_format, 'instance_info'), via: 'http' };
    }
    case 'swift':
      return resolveSwiftObject(info, config, ref, now);
    case 'glance':
      return resolveGlance(config, ref.id, now);
  }
}

async function resolveGlance(config: Readonly<DriverConfig>, id: string, now: number): Promise<ResolvedImage> {
  const glance = glanceOf(config);
  const image = await glance.image(id);
  checkUsable(image);
  const format = formatOf(image.disk_format, `Glance image ${id}`);
  const identity = `glance:${id};${glanceHash(image)}`;
  const hash = image.os_hash_algo && image.os_hash_value ? { algo: image.os_hash_algo, value: image.os_hash_value } : image.checksum ? { algo: 'md5', value: image.checksum } : undefined;
  const size = image.size!;
  const g = config.glance;
  let useSwift: boolean;
  if (g.download_source === 'swift') useSwift = true;
  else if (g.download_source === 'glance') useSwift = false;
  else {
    const store = storeOf(image);
    if (store === 'swift') useSwift = true;
    else if (store === 'file' || store === 'other') useSwift = false;
    else {
      // Locations hidden: whether Glance serves ranges of this image decides.
      useSwift = !(await glance.servesRanges(id));
      if (useSwift && !g.swift_endpoint_url) {
        throw sourceError(`Glance image ${id} is not on Glance's file store (a ranged download is refused) and glance.swift_endpoint_url is not configured for reading it from Swift`);
      }
    }
  }
  if (!useSwift) return { url: glance.fileUrl(id), headers: glance.headers, identity, ...(hash ? { hash } : {}), format, size, via: 'glance-file' };
  const obj: SwiftObject = { container: containerFor(id, g), object: id };
  const t = tempUrl(g, obj, now);
  const head = await headTempUrl(t.url, config, `Glance image ${id} in Swift (${obj.container}/${obj.object})`);
  if (head.size !== size) {
    throw sourceError(`Glance image ${id} is ${size} bytes but the Swift object ${t.path} is ${head.size}: check glance.swift_container and glance.swift_store_multiple_containers_seed against Glance's swift store settings`);
  }
  return { url: t.url, identity, ...(hash ? { hash } : {}), format, size, expires: t.expires, via: 'glance-swift' };
}

async function resolveSwiftObject(info: InstanceInfo, config: Readonly<DriverConfig>, obj: SwiftObject, now: number): Promise<ResolvedImage> {
  const t = tempUrl(config.glance, obj, now);
  const head = await headTempUrl(t.url, config, `Swift object ${obj.container}/${obj.object}`);
  const hash = infoHash(info) ?? (head.etag ? `etag=${head.etag}` : `size=${head.size}`);
  return { url: t.url, identity: `swift:${t.path};${hash}`, format: formatOf(info.image_disk_format, 'instance_info'), size: head.size, expires: t.expires, via: 'swift' };
}

/** Glance's strongest hash of the image, as `algo=value`. */
function glanceHash(image: GlanceImage): string {
  if (image.os_hash_algo && image.os_hash_value) return `${image.os_hash_algo}=${image.os_hash_value}`;
  if (image.checksum) return `md5=${image.checksum}`;
  return `size=${image.size}`;
}

function checkUsable(image: GlanceImage): void {
  if (image.status === 'active' && image.size !== null) return;
  const pending = ['queued', 'saving', 'uploading', 'importing'].includes(image.status);
  throw new DriverError(pending ? 'DRV_ERR_IMAGE_UNREACHABLE' : 'DRV_ERR_IMAGE_SOURCE', `Glance image ${image.id} is ${image.status}${pending ? ' (no data yet)' : ''}; only active images can be deployed`, {
    field: 'instance_info.image_source',
  });
}

const headAgents = { http: new http.Agent({ keepAlive: true }), https: new https.Agent({ keepAlive: true }) };

/**
 * HEAD through the temp URL (a GET temp URL also allows HEAD): proves the key and the
 * path before the agent is involved, and gives size and ETag.
 */
async function headTempUrl(url: string, config: Readonly<DriverConfig>, what: string): Promise<{ size: number; etag: string | null }> {
  let res;
  try {
    res = await axios.head(url, { timeout: config.glance.timeout_ms, validateStatus: () => true, proxy: false, maxRedirects: 0, httpAgent: headAgents.http, httpsAgent: headAgents.https });
  } catch (err) {
    throw new DriverError('DRV_ERR_IMAGE_UNREACHABLE', `${what}: ${redactUrl(url)}: ${(err as Error).message}`, { cause: err, field: 'instance_info.image_source' });
  }
  if (res.status === 404) throw new DriverError('DRV_ERR_IMAGE_NOT_FOUND', `${what}: no such object at ${redactUrl(url)}`, { field: 'instance_info.image_source' });
  if (res.status === 401 || res.status === 403) {
    throw sourceError(`${what}: Swift refused the temp URL (HTTP ${res.status}): glance.swift_temp_url_key must be the account's X-Account-Meta-Temp-URL-Key and glance.swift_account the account that holds the object`);
  }
  if (res.status >= 500 || res.status === 408 || res.status === 429) throw new DriverError('DRV_ERR_IMAGE_UNREACHABLE', `${what}: HTTP ${res.status} from ${redactUrl(url)}`, { field: 'instance_info.image_source' });
  const size = Number(res.headers['content-length']);
  if (res.status !== 200 || !Number.isSafeInteger(size)) throw sourceError(`${what}: HEAD ${redactUrl(url)} answered HTTP ${res.status} without a size`);
  const etag = typeof res.headers['etag'] === 'string' ? res.headers['etag'].replace(/^W\//, '').replace(/"/g, '') : null;
  return { size, etag };
}

/**
 * The part of Glance's image API v2 the driver uses: one image record, and whether the
 * image's download honours a Range request (it does only on the file store; on the Swift
 * store every ranged download is a 400, which is why the DPU reads Swift directly).
 *
 * The types are written here rather than generated: Glance publishes JSON schemas
 * (/v2/schemas/image), not an OpenAPI document, so a YAML of the subset would be ours
 * anyway, and generating TypeScript from it would not check Glance's answers. What does
 * check them is `parseImage`, which validates the few fields the driver relies on at run
 * time and names the one that is wrong.
 */
import http from 'node:http';
import https from 'node:https';
import axios, { type AxiosInstance, type AxiosResponse } from 'axios';
import { DriverError } from './errors.js';

/** GET /v2/images/{id}: the fields used (Glance sends more). */
export interface GlanceImage {
  id: string;
  status: 'queued' | 'saving' | 'active' | 'killed' | 'deleted' | 'pending_delete' | 'deactivated' | 'uploading' | 'importing' | string;
  /** Bytes of image data; null until uploaded. */
  size: number | null;
  virtual_size: number | null;
  disk_format: string | null;
  container_format: string | null;
  /** md5 of the data (legacy). */
  checksum: string | null;
  os_hash_algo: string | null;
  os_hash_value: string | null;
  /** Shown only with `show_multiple_locations` (locations) / `show_image_direct_url`. */
  locations?: { url: string; metadata?: Record<string, unknown> }[];
  direct_url?: string;
}

export interface GlanceOptions {
  url: string;
  headers: Record<string, string>;
  timeout_ms: number;
}

/** Where Glance keeps an image, from its locations, when Glance shows them. */
export type GlanceStoreKind = 'swift' | 'file' | 'other' | 'unknown';

export class GlanceClient {
  private readonly http: AxiosInstance;
  readonly base: string;

  constructor(private readonly opts: GlanceOptions) {
    this.base = opts.url.replace(/\/+$/, '');
    this.http = axios.create({
      baseURL: this.base,
      timeout: opts.timeout_ms,
      headers: opts.headers,
      validateStatus: () => true,
      proxy: false,
      maxRedirects: 0,
      httpAgent: new http.Agent({ keepAlive: true }),
      httpsAgent: new https.Agent({ keepAlive: true }),
    });
  }

  /** What the DPU downloads from on the file store. */
  fileUrl(id: string): string {
    return `${this.base}/v2/images/${encodeURIComponent(id)}/file`;
  }

  get headers(): Record<string, string> {
    return { ...this.opts.headers };
  }

  async image(id: string): Promise<GlanceImage> {
    const res = await this.send(`image ${id}`, () => this.http.get<unknown>(`/v2/images/${encodeURIComponent(id)}`));
    if (res.status === 404) throw new DriverError('DRV_ERR_IMAGE_NOT_FOUND', `Glance at ${this.base} has no image ${id}`, { field: 'instance_info.image_source' });
    this.check(res, `image ${id}`);
    return parseImage(res.data, id);
  }

  /**
   * Asks for the first byte of the image. 206: Glance serves ranges of it (file store);
   * 400: it does not (Swift and other stores raise StoreRandomGetNotSupported).
   */
  async servesRanges(id: string): Promise<boolean> {
    const res = await this.send(`ranged download of ${id}`, () => this.http.get(`/v2/images/${encodeURIComponent(id)}/file`, { headers: { Range: 'bytes=0-0' }, responseType: 'arraybuffer', maxContentLength: 1 << 20 }));
    if (res.status === 206) return true;
    if (res.status === 400 || res.status === 416 || res.status === 200) return false;
    this.check(res, `ranged download of ${id}`);
    return false;
  }

  private async send<T>(what: string, fn: () => Promise<AxiosResponse<T>>): Promise<AxiosResponse<T>> {
    try {
      return await fn();
    } catch (err) {
      const e = err as { code?: string; message?: string };
      throw new DriverError('DRV_ERR_IMAGE_UNREACHABLE', `Glance at ${this.base} (${what}): ${e.code ?? ''} ${e.message ?? String(err)}`.trim(), { cause: err, field: 'instance_info.image_source' });
    }
  }

  private check(res: AxiosResponse, what: string): void {
    if (res.status >= 200 && res.status < 300) return;
    const transient = res.status >= 500 || res.status === 408 || res.status === 429;
    if (transient) throw new DriverError('DRV_ERR_IMAGE_UNREACHABLE', `Glance at ${this.base} (${what}): HTTP ${res.status}`, { field: 'instance_info.image_source' });
    const hint = res.status === 401 || res.status === 403 ? '; check glance.headers (a token Glance accepts)' : '';
    throw new DriverError('DRV_ERR_IMAGE_SOURCE', `Glance at ${this.base} (${what}): HTTP ${res.status}${hint}`, { field: 'instance_info.image_source' });
  }
}

/** Which store the record's locations point into; `unknown` when Glance hides them. */
export function storeOf(image: GlanceImage): GlanceStoreKind {
  const urls = [...(image.locations ?? []).map((l) => l.url), ...(image.direct_url ? [image.direct_url] : [])];
  if (urls.length === 0) return 'unknown';
  // swift://, swift+http(s)://, swift+config://
  if (urls.some((u) => /^swift(\+[a-z]+)?:\/\//i.test(u))) return 'swift';
  if (urls.some((u) => /^file:\/\//i.test(u))) return 'file';
  return 'other';
}

function parseImage(data: unknown, id: string): GlanceImage {
  const bad = (field: string, want: string): DriverError => new DriverError('DRV_ERR_IMAGE_SOURCE', `Glance's record of image ${id}: "${field}" is not ${want}`, { field: 'instance_info.image_source' });
  if (!data || typeof data !== 'object') throw bad('(body)', 'a JSON object');
  const r = data as Record<string, unknown>;
  const str = (k: string): string | null => {
    const v = r[k];
    if (v === undefined || v === null) return null;
    if (typeof v !== 'string') throw bad(k, 'a string');
    return v;
  };
  const int = (k: string): number | null => {
    const v = r[k];
    if (v === undefined || v === null) return null;
    if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0) throw bad(k, 'a non-negative integer');
    return v;
  };
  if (typeof r['id'] !== 'string') throw bad('id', 'a string');
  if (typeof r['status'] !== 'string') throw bad('status', 'a string');
  const locations = r['locations'];
  if (locations !== undefined && (!Array.isArray(locations) || locations.some((l) => !l || typeof (l as { url?: unknown }).url !== 'string'))) throw bad('locations', 'a list of {url}');
  const direct = str('direct_url');
  return {
    id: r['id'],
    status: r['status'],
    size: int('size'),
    virtual_size: int('virtual_size'),
    disk_format: str('disk_format'),
    container_format: str('container_format'),
    checksum: str('checksum'),
    os_hash_algo: str('os_hash_algo'),
    os_hash_value: str('os_hash_value'),
    ...(locations !== undefined ? { locations: locations as GlanceImage['locations'] } : {}),
    ...(direct !== null ? { direct_url: direct } : {}),
  };
}

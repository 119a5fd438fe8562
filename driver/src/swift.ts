/**
 * Swift temp URLs, built exactly as Ironic builds them for `image_download_source = swift`
 * (ironic/common/glance_service/image_service.py, swift_temp_url), so an operator's
 * `[glance]` options mean the same here:
 *
 *   {swift_endpoint_url without /v1/<prefix>_x}/{swift_api_version}/{swift_account}/{container}/{object}
 *     ?temp_url_sig=<HMAC-SHA256 hex of "GET\n<expires>\n<path>">&temp_url_expires=<unix seconds>
 *
 * container is `swift_container`, or `<swift_container>_<first N characters of the image
 * id>` (dashes not counted) when `swift_store_multiple_containers_seed = N`, as Glance's
 * Swift store names it. The account is `swift_account`, else the one swift_endpoint_url
 * names (`…/v1/AUTH_x`): with no Keystone there is no project to derive it from. Swift's
 * tempurl middleware checks the signature against the decoded path, so the path is signed
 * as is and percent-encoded only in the URL.
 */
import { createHmac } from 'node:crypto';
import { DriverError } from './errors.js';

/** The `glance.swift_*` options (config.ts), as the signer needs them. */
export interface SwiftOptions {
  swift_endpoint_url?: string;
  swift_api_version: string;
  swift_account?: string;
  swift_account_prefix: string;
  swift_container: string;
  swift_temp_url_key?: string;
  swift_temp_url_duration: number;
  swift_store_multiple_containers_seed: number;
}

export interface SwiftObject {
  container: string;
  object: string;
}

export interface TempUrl {
  url: string;
  /** Unix seconds. */
  expires: number;
  /** /v1/AUTH_x/container/object, decoded: what was signed. */
  path: string;
}

/** Glance's container for an image (glance_store's get_container_name, as Ironic copies it). */
export function containerFor(imageId: string, o: Pick<SwiftOptions, 'swift_container' | 'swift_store_multiple_containers_seed'>): string {
  const seed = o.swift_store_multiple_containers_seed;
  if (seed <= 0) return o.swift_container;
  const id = imageId.toLowerCase();
  const dashes = (id.slice(0, seed).match(/-/g) ?? []).length;
  return `${o.swift_container}_${id.slice(0, seed + dashes)}`;
}

function prefixOf(o: Pick<SwiftOptions, 'swift_account_prefix'>): string {
  const p = o.swift_account_prefix;
  return p && !p.endsWith('_') ? `${p}_` : p;
}

/** The endpoint without a trailing /v1/<prefix>_x (Ironic strips it), and the account. */
export function swiftEndpoint(o: SwiftOptions): { base: string; account: string } {
  if (!o.swift_endpoint_url) throw notConfigured('glance.swift_endpoint_url');
  const prefix = prefixOf(o);
  const m = new RegExp(`/v1/(${escapeRe(prefix)}[^/]+)/?$`).exec(o.swift_endpoint_url);
  const base = (m ? o.swift_endpoint_url.slice(0, m.index) : o.swift_endpoint_url).replace(/\/+$/, '');
  const account = o.swift_account ?? m?.[1];
  if (!account) throw notConfigured('glance.swift_account', `or a swift_endpoint_url ending in /v1/${prefix}<project>`);
  return { base, account };
}

/** HMAC-SHA256 hex of `METHOD\nexpires\npath`: Swift's tempurl signature (python-swiftclient's default digest). */
export function tempUrlSignature(key: string, method: string, expires: number, path: string): string {
  return createHmac('sha256', key).update(`${method.toUpperCase()}\n${expires}\n${path}`).digest('hex');
}

/** A GET temp URL for container/object, valid for swift_temp_url_duration seconds from `now`. */
export function tempUrl(o: SwiftOptions, obj: SwiftObject, now: number = Date.now()): TempUrl {
  const { base, account } = swiftEndpoint(o);
  const key = o.swift_temp_url_key;
  if (!key) throw notConfigured('glance.swift_temp_url_key', "(the Swift account's X-Account-Meta-Temp-URL-Key)");
  const expires = Math.floor(now / 1000) + o.swift_temp_url_duration;
  const segments = [o.swift_api_version, account, obj.container, ...obj.object.split('/')];
  const path = `/${segments.join('/')}`;
  const sig = tempUrlSignature(key, 'GET', expires, path);
  const encoded = `/${segments.map(encodeURIComponent).join('/')}`;
  return { url: `${base}${encoded}?temp_url_sig=${sig}&temp_url_expires=${expires}`, expires, path };
}

/**
 * The container and object an http(s) URL names when it is an object of the configured
 * Swift account (`<endpoint>/v1/<account>/<container>/<object>`) and not already signed;
 * null for any other URL.
 */
export function objectOfUrl(o: SwiftOptions, url: URL): SwiftObject | null {
  if (!o.swift_endpoint_url || url.searchParams.has('temp_url_sig')) return null;
  let base: string;
  let account: string;
  try {
    ({ base, account } = swiftEndpoint(o));
  } catch {
    return null;
  }
  const root = new URL(base);
  if (root.origin !== url.origin) return null;
  const prefix = `${root.pathname.replace(/\/+$/, '')}/${o.swift_api_version}/${account}/`;
  if (!url.pathname.startsWith(prefix)) return null;
  const rest = url.pathname.slice(prefix.length).split('/').map(decodeURIComponent);
  const [container, ...object] = rest;
  if (!container || object.length === 0 || object.some((s) => s === '')) return null;
  return { container, object: object.join('/') };
}

function notConfigured(key: string, hint = ''): DriverError {
  return new DriverError('DRV_ERR_IMAGE_SOURCE', `a Swift temp URL is needed but config key "${key}" is not set${hint ? ` ${hint}` : ''}`, { field: 'instance_info.image_source' });
}

function escapeRe(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}

/**
 * Real OpenStack image services for tests, from Debian packages (scripts/install-deps.sh):
 * memcached, a single-node Swift and Glance — on the file store, on the Swift store, or
 * both — each on free loopback ports in a directory of its own, stopped by PID. With
 * `netns`, memcached and Swift run inside a network namespace of ours instead, on its address.
 *
 *   memcached       tempauth keeps its tokens there (the proxy refuses to authenticate
 *                   without a cache)
 *   Swift           1-replica rings with one device that is a plain directory
 *                   (`mount_check = false`); account, container, object and proxy servers
 *                   started directly (`swift-*-server CONF`: Debian ships no swift-init),
 *                   `workers = 0` so each is one process whose PID we hold; tempauth and
 *                   tempurl in the proxy pipeline, dlo/slo for Glance's segmented images
 *   Glance          `[paste_deploy] flavor =` empty: no Keystone, every request runs with
 *                   an admin context; sqlite; `workers = 0`; locations shown so tests (and
 *                   the driver) can tell the stores apart. The schema is made once per
 *                   Glance version (`glance-manage db_sync`), kept, and copied.
 *
 * Everything that can start at once does: memcached, the four Swift servers and the Glance
 * schema in parallel, then the Glance API servers (the Swift store is contacted only on
 * upload). `timings` says where the start-up time went: ~6 s here (2 cores, six Python
 * servers importing at once), ~10 s on the first run while the Glance schema is made.
 */
import { type ChildProcess, execFile, spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { freePort } from './redis.js';

/** Glance's image record, the fields tests look at (GET /v2/images/{id}). */
export interface GlanceImage {
  id: string;
  name: string | null;
  status: string;
  size: number | null;
  virtual_size: number | null;
  disk_format: string | null;
  container_format: string | null;
  checksum: string | null;
  os_hash_algo: string | null;
  os_hash_value: string | null;
  locations?: { url: string; metadata: Record<string, unknown> }[];
  direct_url?: string;
}

export type GlanceStore = 'file' | 'swift';

export interface OpenStackOptions {
  /** Which Glance API servers to start. @default ['file', 'swift'] */
  glance?: GlanceStore[];
  /**
   * Glance writes images larger than this (MiB) to Swift as segments plus a manifest
   * (`swift_store_large_object_size`), as it does in production with 5 GiB. @default 4
   */
  largeObjectMiB?: number;
  /** Segment size for those (`swift_store_large_object_chunk_size`, MiB). @default 2 */
  segmentMiB?: number;
  /**
   * Runs memcached and the four Swift servers inside this network namespace (one we made,
   * e.g. lab/netns.ts's EmulatedLink), bound to `address` there, so every client in the
   * root namespace — Glance's Swift store, the driver, the agent — reaches Swift across
   * the namespace's (shaped) link. Glance stays on 127.0.0.1. @default loopback, no namespace
   */
  netns?: SwiftNetns;
}

/** A network namespace (`ip netns` name) and the address inside it that servers bind. */
export interface SwiftNetns {
  name: string;
  address: string;
}

/** `cmd args`, or `ip netns exec NAME cmd args` (ip execs the command: the PID stays the server's). */
function inNetns(netns: SwiftNetns | undefined, cmd: string, args: string[]): [string, string[]] {
  return netns ? ['ip', ['netns', 'exec', netns.name, cmd, ...args]] : [cmd, args];
}

/** Polls until something accepts TCP connections on host:port; fails early if the server dies. */
async function waitTcp(host: string, port: number, proc: ServerProcess, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (!proc.running) throw new Error(`${proc.name} exited during start-up; ${proc.logFile}:\n${proc.logTail()}`);
    const ok = await new Promise<boolean>((resolve) => {
      const c = net.connect(port, host);
      c.once('connect', () => {
        c.destroy();
        resolve(true);
      });
      c.once('error', () => resolve(false));
    });
    if (ok) return;
    if (Date.now() > deadline) throw new Error(`nothing listens on ${host}:${port} after ${timeoutMs} ms; ${proc.logFile}:\n${proc.logTail()}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

const SWIFT_USER = { account: 'test', user: 'tester', key: 'testing' };
const SWIFT_SERVERS = ['account', 'container', 'object'] as const;

/** Servers still running: killed when the test process exits without stopping them (a crash). */
const running = new Set<ChildProcess>();
process.once('exit', () => {
  for (const c of running) c.kill('SIGKILL');
});

/** One server process, its output in a log file, stopped by PID. */
class ServerProcess {
  readonly child: ChildProcess;
  private readonly exited: Promise<void>;

  constructor(
    readonly name: string,
    readonly logFile: string,
    cmd: string,
    args: string[],
  ) {
    const fd = fs.openSync(logFile, 'a');
    try {
      this.child = spawn(cmd, args, { stdio: ['ignore', fd, fd] });
    } finally {
      fs.closeSync(fd);
    }
    this.child.on('error', () => undefined);
    running.add(this.child);
    this.exited = new Promise((resolve) =>
      this.child.once('exit', () => {
        running.delete(this.child);
        resolve();
      }),
    );
  }

  get running(): boolean {
    return this.child.exitCode === null && this.child.signalCode === null;
  }

  logTail(bytes = 3000): string {
    try {
      const text = fs.readFileSync(this.logFile, 'utf8');
      return text.slice(-bytes);
    } catch {
      return '';
    }
  }

  /** SIGTERM, then SIGKILL if it has not exited within `graceMs`. */
  async stop(graceMs = 5000): Promise<void> {
    if (!this.running) return;
    this.child.kill('SIGTERM');
    const timer = setTimeout(() => this.child.kill('SIGKILL'), graceMs);
    await this.exited;
    clearTimeout(timer);
  }
}

/** Polls until `url` answers anything over HTTP; fails early, with its log, if the server dies. */
async function waitHttp(url: string, proc: ServerProcess, timeoutMs = 60_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (!proc.running) throw new Error(`${proc.name} exited during start-up; ${proc.logFile}:\n${proc.logTail()}`);
    try {
      const res = await fetch(url, { signal: AbortSignal.timeout(2000) });
      await res.arrayBuffer();
      return;
    } catch {
      // not listening yet
    }
    if (Date.now() > deadline) throw new Error(`${proc.name} did not answer ${url} within ${timeoutMs} ms; ${proc.logFile}:\n${proc.logTail()}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

function execOk(cmd: string, args: string[]): Promise<string> {
  return new Promise((resolve, reject) =>
    execFile(cmd, args, { maxBuffer: 16 << 20 }, (err, stdout, stderr) => (err ? reject(new Error(`${cmd} ${args.join(' ')}: ${stderr || err.message}`)) : resolve(stdout))),
  );
}

function ini(sections: Record<string, Record<string, string | number | boolean>>): string {
  return (
    Object.entries(sections)
      .map(([name, kv]) => `[${name}]\n${Object.entries(kv).map(([k, v]) => `${k} = ${String(v)}`).join('\n')}\n`)
      .join('\n') + '\n'
  );
}

async function timed<T>(timings: Record<string, number>, what: string, fn: () => Promise<T>): Promise<T> {
  const t0 = Date.now();
  try {
    return await fn();
  } finally {
    timings[what] = Date.now() - t0;
  }
}

export class Memcached {
  port = 0;
  private proc: ServerProcess | null = null;

  constructor(
    private readonly dir: string,
    private readonly netns?: SwiftNetns,
  ) {}

  /** The address it listens on: 127.0.0.1, or the namespace's address. */
  get host(): string {
    return this.netns?.address ?? '127.0.0.1';
  }

  async start(): Promise<void> {
    this.port = await freePort();
    // memcached refuses to run as root unless told which user to run as.
    const asUser = process.getuid?.() === 0 ? ['-u', 'root'] : [];
    this.proc = new ServerProcess('memcached', path.join(this.dir, 'memcached.log'), ...inNetns(this.netns, 'memcached', ['-l', this.host, '-p', String(this.port), '-U', '0', '-m', '16', ...asUser]));
    await waitTcp(this.host, this.port, this.proc);
  }

  processes(): ServerProcess[] {
    return this.proc ? [this.proc] : [];
  }

  async stop(): Promise<void> {
    await this.proc?.stop();
    this.proc = null;
  }
}

export class Swift {
  readonly dir: string;
  proxyPort = 0;
  private ports: Record<(typeof SWIFT_SERVERS)[number], number> | null = null;
  readonly account = `AUTH_${SWIFT_USER.account}`;
  readonly credentials = { user: `${SWIFT_USER.account}:${SWIFT_USER.user}`, key: SWIFT_USER.key };
  private procs: ServerProcess[] = [];
  private cachedToken: string | null = null;

  constructor(
    dir: string,
    private readonly memcachedPort: number,
    private readonly netns?: SwiftNetns,
    private readonly memcachedHost = netns?.address ?? '127.0.0.1',
  ) {
    this.dir = dir;
  }

  /** The address every Swift server binds: 127.0.0.1, or the namespace's address. */
  get host(): string {
    return this.netns?.address ?? '127.0.0.1';
  }

  /** The proxy's root, e.g. http://127.0.0.1:PORT (what Ironic calls swift_endpoint_url). */
  get url(): string {
    return `http://${this.host}:${this.proxyPort}`;
  }

  /** The v1 (tempauth) authentication URL. */
  get authUrl(): string {
    return `${this.url}/auth/v1.0`;
  }

  /** The test account's storage URL: http://127.0.0.1:PORT/v1/AUTH_test (or the namespace's address). */
  get storageUrl(): string {
    return `${this.url}/v1/${this.account}`;
  }

  /** Chooses the four servers' ports (start() does it too, if not done yet). */
  async allocatePorts(): Promise<void> {
    if (this.ports) return;
    this.ports = { account: await freePort(), container: await freePort(), object: await freePort() };
    this.proxyPort = await freePort();
  }

  async start(timings: Record<string, number> = {}): Promise<void> {
    ensureSwiftConf();
    const devices = path.join(this.dir, 'srv');
    fs.mkdirSync(path.join(devices, 'd1'), { recursive: true });
    await this.allocatePorts();
    const ports = this.ports!;
    await timed(timings, 'swift rings', () => this.buildRings(ports));
    const common = { bind_ip: this.host, workers: 0, swift_dir: this.dir, log_level: 'WARNING', log_name: 'swift' };
    for (const s of SWIFT_SERVERS) {
      fs.writeFileSync(
        path.join(this.dir, `${s}-server.conf`),
        ini({
          DEFAULT: { ...common, bind_port: ports[s], devices, mount_check: false, log_name: `${s}-server` },
          'pipeline:main': { pipeline: `${s}-server` },
          [`app:${s}-server`]: { use: `egg:swift#${s}` },
        }),
      );
    }
    fs.writeFileSync(
      path.join(this.dir, 'proxy-server.conf'),
      ini({
        DEFAULT: { ...common, bind_port: this.proxyPort, log_name: 'proxy-server' },
        'pipeline:main': { pipeline: 'catch_errors gatekeeper healthcheck proxy-logging cache listing_formats bulk tempurl tempauth copy slo dlo proxy-logging proxy-server' },
        'app:proxy-server': { use: 'egg:swift#proxy', account_autocreate: true },
        'filter:tempauth': { use: 'egg:swift#tempauth', [`user_${SWIFT_USER.account}_${SWIFT_USER.user}`]: `${SWIFT_USER.key} .admin ${this.storageUrl}` },
        'filter:cache': { use: 'egg:swift#memcache', memcache_servers: `${this.memcachedHost}:${this.memcachedPort}` },
        'filter:tempurl': { use: 'egg:swift#tempurl' },
        'filter:healthcheck': { use: 'egg:swift#healthcheck' },
        'filter:catch_errors': { use: 'egg:swift#catch_errors' },
        'filter:gatekeeper': { use: 'egg:swift#gatekeeper' },
        'filter:proxy-logging': { use: 'egg:swift#proxy_logging' },
        'filter:listing_formats': { use: 'egg:swift#listing_formats' },
        'filter:bulk': { use: 'egg:swift#bulk' },
        'filter:copy': { use: 'egg:swift#copy' },
        'filter:slo': { use: 'egg:swift#slo' },
        'filter:dlo': { use: 'egg:swift#dlo' },
      }),
    );
    await timed(timings, 'swift servers', async () => {
      for (const s of [...SWIFT_SERVERS, 'proxy'] as const) {
        // --verbose: log to stderr (the log file) as well as to syslog.
        this.procs.push(new ServerProcess(`swift-${s}-server`, path.join(this.dir, `${s}.log`), ...inNetns(this.netns, `/usr/bin/swift-${s}-server`, [path.join(this.dir, `${s}-server.conf`), '--verbose'])));
      }
      await Promise.all([
        ...SWIFT_SERVERS.map((s, i) => waitHttp(`http://${this.host}:${ports[s]}/`, this.procs[i]!)),
        waitHttp(`${this.url}/healthcheck`, this.procs[3]!),
      ]);
    });
  }

  /**
   * The three 1-replica rings, one device each. This is what `swift-ring-builder FILE
   * create 4 1 1`, `add r1z1-HOST:PORT/d1 1` and `rebalance` do, through the same
   * RingBuilder class, in one interpreter: nine swift-ring-builder runs cost ~4.5 s here,
   * this ~0.4 s.
   */
  private async buildRings(ports: Record<(typeof SWIFT_SERVERS)[number], number>): Promise<void> {
    const script = [
      'import sys',
      'from swift.common.ring import RingBuilder',
      'd, ip = sys.argv[1], sys.argv[5]',
      'for name, port in zip(("account", "container", "object"), map(int, sys.argv[2:5])):',
      '    b = RingBuilder(4, 1, 1)',
      "    b.add_dev({'region': 1, 'zone': 1, 'ip': ip, 'port': port, 'device': 'd1', 'weight': 1})",
      '    b.rebalance()',
      "    b.save(f'{d}/{name}.builder')",
      "    b.get_ring().save(f'{d}/{name}.ring.gz')",
    ].join('\n');
    // /usr/bin/python3: the Debian interpreter that has swift (another python3 may come first on PATH).
    await execOk('/usr/bin/python3', ['-c', script, this.dir, String(ports.account), String(ports.container), String(ports.object), this.host]);
  }

  /** A tempauth token for the test account (cached; tempauth tokens live a day). */
  async token(): Promise<string> {
    if (this.cachedToken) return this.cachedToken;
    const res = await fetch(this.authUrl, { headers: { 'X-Auth-User': this.credentials.user, 'X-Auth-Key': this.credentials.key } });
    await res.arrayBuffer();
    const token = res.headers.get('x-auth-token');
    if (res.status !== 200 || !token) throw new Error(`tempauth: HTTP ${res.status}`);
    this.cachedToken = token;
    return token;
  }

  /** Sets the account's X-Account-Meta-Temp-URL-Key (what temp URLs are signed with). */
  async setTempUrlKey(key: string): Promise<void> {
    const res = await fetch(this.storageUrl, { method: 'POST', headers: { 'X-Auth-Token': await this.token(), 'X-Account-Meta-Temp-URL-Key': key } });
    await res.arrayBuffer();
    if (res.status !== 204) throw new Error(`setting the temp-URL key: HTTP ${res.status}`);
  }

  /** An authenticated request to the test account (path after /v1/AUTH_test). */
  async request(method: string, objectPath: string, init: { headers?: Record<string, string>; body?: Buffer } = {}): Promise<Response> {
    return fetch(`${this.storageUrl}/${objectPath.replace(/^\/+/, '')}`, { method, headers: { 'X-Auth-Token': await this.token(), ...init.headers }, ...(init.body ? { body: init.body } : {}) });
  }

  /** Stores `data` as container/object (creating the container). */
  async putObject(container: string, object: string, data: Buffer): Promise<void> {
    for (const [p, body] of [[container, undefined], [`${container}/${object}`, data]] as const) {
      const res = await this.request('PUT', p, body ? { body } : {});
      await res.arrayBuffer();
      if (res.status !== 201 && res.status !== 202) throw new Error(`PUT ${p}: HTTP ${res.status}`);
    }
  }

  /** Swift's own temp URL (python-swiftclient's generate_temp_url), to check ours against. */
  async swiftclientTempUrl(objectPath: string, expires: number, key: string): Promise<string> {
    const out = await execOk('/usr/bin/python3', ['-c', 'import sys\nfrom swiftclient.utils import generate_temp_url\nprint(generate_temp_url(sys.argv[1], int(sys.argv[2]), sys.argv[3], "GET", absolute=True))', objectPath, String(expires), key]);
    return `${this.url}${out.trim()}`;
  }

  processes(): ServerProcess[] {
    return this.procs;
  }

  async stop(): Promise<void> {
    await Promise.all(this.procs.map((p) => p.stop()));
    this.procs = [];
  }
}

/**
 * Swift reads its hash prefix and suffix from /etc/swift/swift.conf, whatever swift_dir
 * says (swift.common.utils.SWIFT_CONF_FILE is a fixed path; only recon can point it
 * elsewhere), and refuses to start without them. The swift package installs one; a
 * machine without it gets a test one. An existing file is never changed: it may belong
 * to a real Swift.
 */
function ensureSwiftConf(): void {
  const file = '/etc/swift/swift.conf';
  if (fs.existsSync(file)) return;
  fs.mkdirSync(path.dirname(file), { recursive: true });
  fs.writeFileSync(file, ini({ 'swift-hash': { swift_hash_path_suffix: 'smartnic-test', swift_hash_path_prefix: 'smartnic-test' }, 'storage-policy:0': { name: 'Policy-0', default: 'yes' } }), { flag: 'wx' });
}

export class Glance {
  port = 0;
  private proc: ServerProcess | null = null;

  constructor(
    readonly store: GlanceStore,
    readonly dir: string,
    private readonly opts: { schema: string; swift: Swift; largeObjectMiB: number; segmentMiB: number },
  ) {}

  get url(): string {
    return `http://127.0.0.1:${this.port}`;
  }

  /** The Swift container Glance stores images in (single-container mode). */
  static readonly CONTAINER = 'glance';

  async start(): Promise<void> {
    fs.mkdirSync(path.join(this.dir, 'locks'), { recursive: true });
    this.port = await freePort();
    const db = path.join(this.dir, 'glance.sqlite');
    fs.copyFileSync(this.opts.schema, db);
    let store: Record<string, string | number | boolean>;
    if (this.store === 'file') {
      fs.mkdirSync(path.join(this.dir, 'images'), { recursive: true });
      store = { stores: 'file', default_store: 'file', filesystem_store_datadir: path.join(this.dir, 'images') };
    } else {
      const swift = this.opts.swift;
      const refs = path.join(this.dir, 'glance-swift.conf');
      fs.writeFileSync(refs, ini({ ref1: { user: swift.credentials.user, key: swift.credentials.key, auth_version: 1, auth_address: swift.authUrl } }), { mode: 0o600 });
      store = {
        stores: 'swift',
        default_store: 'swift',
        swift_store_config_file: refs,
        default_swift_reference: 'ref1',
        swift_store_container: Glance.CONTAINER,
        swift_store_create_container_on_put: true,
        swift_store_multi_tenant: false,
        swift_store_large_object_size: this.opts.largeObjectMiB,
        swift_store_large_object_chunk_size: this.opts.segmentMiB,
      };
    }
    const conf = path.join(this.dir, 'glance-api.conf');
    // Without Keystone every request runs as an anonymous context that Glance's default
    // policy does not let publicize an image; Ironic without Keystone sees public images
    // only, so the tests that resolve images through Ironic need them.
    const policy = path.join(this.dir, 'policy.yaml');
    fs.writeFileSync(policy, '"publicize_image": ""\n');
    fs.writeFileSync(
      conf,
      ini({
        DEFAULT: {
          bind_host: '127.0.0.1',
          bind_port: this.port,
          workers: 0,
          show_image_direct_url: true,
          show_multiple_locations: true,
          log_file: path.join(this.dir, 'glance-api.log'),
          use_stderr: false,
        },
        database: { connection: `sqlite:///${db}` },
        paste_deploy: { flavor: '', config_file: '/etc/glance/glance-api-paste.ini' },
        glance_store: store,
        oslo_concurrency: { lock_path: path.join(this.dir, 'locks') },
        oslo_policy: { policy_file: policy },
      }),
    );
    this.proc = new ServerProcess(`glance-api (${this.store} store)`, path.join(this.dir, 'glance-api.out'), '/usr/bin/glance-api', ['--config-file', conf]);
    await waitHttp(`${this.url}/versions`, this.proc);
  }

  processes(): ServerProcess[] {
    return this.proc ? [this.proc] : [];
  }

  /** Creates an image record (extra `properties` such as kernel_id) and uploads its data; returns the record after the upload. */
  async uploadImage(data: Buffer, opts: { name?: string; disk_format?: string; container_format?: string; visibility?: 'public' | 'private' | 'shared'; properties?: Record<string, string> } = {}): Promise<GlanceImage> {
    const created = await this.json<GlanceImage>('POST', '/v2/images', {
      name: opts.name ?? 'test-image',
      disk_format: opts.disk_format ?? 'raw',
      container_format: opts.container_format ?? 'bare',
      // Ironic without Keystone sees public images only (service_utils.is_image_available).
      ...(opts.visibility ? { visibility: opts.visibility } : {}),
      ...opts.properties,
    });
    const res = await fetch(`${this.url}/v2/images/${created.id}/file`, { method: 'PUT', headers: { 'Content-Type': 'application/octet-stream' }, body: data });
    const text = await res.text();
    if (res.status !== 204) throw new Error(`uploading image ${created.id}: HTTP ${res.status} ${text.slice(0, 500)}\n${this.logTail()}`);
    return this.image(created.id);
  }

  async image(id: string): Promise<GlanceImage> {
    return this.json<GlanceImage>('GET', `/v2/images/${id}`);
  }

  async deleteImage(id: string): Promise<void> {
    const res = await fetch(`${this.url}/v2/images/${id}`, { method: 'DELETE' });
    await res.arrayBuffer();
    if (res.status !== 204) throw new Error(`deleting image ${id}: HTTP ${res.status}`);
  }

  /** GET /v2/images/{id}/file with optional headers (Range), for asserting Glance's own behaviour. */
  async download(id: string, headers: Record<string, string> = {}): Promise<{ status: number; headers: Headers; body: Buffer }> {
    const res = await fetch(`${this.url}/v2/images/${id}/file`, { headers });
    return { status: res.status, headers: res.headers, body: Buffer.from(await res.arrayBuffer()) };
  }

  logTail(bytes = 3000): string {
    try {
      return fs.readFileSync(path.join(this.dir, 'glance-api.log'), 'utf8').slice(-bytes);
    } catch {
      return this.proc?.logTail(bytes) ?? '';
    }
  }

  private async json<T>(method: string, p: string, body?: unknown): Promise<T> {
    const res = await fetch(`${this.url}${p}`, { method, ...(body ? { headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(body) } : {}) });
    const text = await res.text();
    if (res.status >= 300) throw new Error(`${method} ${p}: HTTP ${res.status} ${text.slice(0, 500)}`);
    return JSON.parse(text) as T;
  }

  async stop(): Promise<void> {
    await this.proc?.stop();
    this.proc = null;
  }
}

/**
 * An empty Glance database with the current schema. `glance-manage db_sync` takes 1.5–5 s
 * here (more while Swift starts beside it), so the result is kept in the temp directory
 * per installed Glance version and copied; a new Glance package gets a new schema.
 */
async function glanceSchema(dir: string): Promise<string> {
  const egg = fs.readdirSync('/usr/lib/python3/dist-packages').find((f) => /^glance-[\d.]+.*\.egg-info$/.test(f)) ?? 'glance-unknown';
  const cached = path.join(os.tmpdir(), `smartnic-test-${egg.replace(/\.egg-info$/, '')}-schema.sqlite`);
  if (fs.existsSync(cached)) return cached;
  const file = path.join(dir, 'glance-schema.sqlite');
  // glance-manage reads only [database] here.
  const conf = path.join(dir, 'glance-manage.conf');
  fs.writeFileSync(conf, ini({ DEFAULT: { log_file: path.join(dir, 'glance-manage.log'), use_stderr: false }, database: { connection: `sqlite:///${file}` } }));
  await execOk('/usr/bin/glance-manage', ['--config-file', conf, 'db_sync']);
  // Copy, then rename: a concurrent run never sees half a file.
  const tmp = `${cached}.${process.pid}.tmp`;
  fs.copyFileSync(file, tmp);
  fs.renameSync(tmp, cached);
  return file;
}

/** memcached + Swift + the Glance servers asked for, started together; `stop()` ends them all. */
export class OpenStack {
  readonly memcached: Memcached;
  swift!: Swift;
  readonly glance: Partial<Record<GlanceStore, Glance>> = {};
  /** Milliseconds per start-up phase, and `total`. */
  readonly timings: Record<string, number> = {};

  private constructor(
    readonly dir: string,
    private readonly netns?: SwiftNetns,
  ) {
    this.memcached = new Memcached(dir, netns);
  }

  static async start(dir: string, opts: OpenStackOptions = {}): Promise<OpenStack> {
    const stack = new OpenStack(dir, opts.netns);
    const t0 = Date.now();
    try {
      await stack.startAll(opts);
    } catch (err) {
      await stack.stop();
      throw err;
    }
    stack.timings['total'] = Date.now() - t0;
    return stack;
  }

  private async startAll(opts: OpenStackOptions): Promise<void> {
    const stores = opts.glance ?? ['file', 'swift'];
    fs.mkdirSync(path.join(this.dir, 'swift'), { recursive: true });
    const dbSync = stores.length ? timed(this.timings, 'glance schema', () => glanceSchema(this.dir)) : Promise.resolve('');
    await timed(this.timings, 'memcached', () => this.memcached.start());
    this.swift = new Swift(path.join(this.dir, 'swift'), this.memcached.port, this.netns, this.memcached.host);
    // Ports first: the Swift-store Glance's config names the proxy, which need not be up
    // until the first upload, so Glance starts alongside Swift.
    await this.swift.allocatePorts();
    const swiftUp = this.swift.start(this.timings);
    swiftUp.catch(() => undefined); // awaited below; this only keeps an early failure elsewhere from leaving it unhandled
    const schema = await dbSync;
    for (const store of stores) {
      this.glance[store] = new Glance(store, path.join(this.dir, `glance-${store}`), { schema, swift: this.swift, largeObjectMiB: opts.largeObjectMiB ?? 4, segmentMiB: opts.segmentMiB ?? 2 });
    }
    const glanceUp = Promise.all(stores.map((store) => timed(this.timings, `glance-api (${store})`, () => this.glance[store]!.start())));
    await Promise.all([swiftUp, glanceUp]);
  }

  /** Stops every process by PID (Glance first, then Swift, then memcached). */
  async stop(): Promise<void> {
    await Promise.all(Object.values(this.glance).map((g) => g.stop()));
    await this.swift?.stop();
    await this.memcached.stop();
  }
}

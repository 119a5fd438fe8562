/**
 * A real Ironic for tests: Debian's `/usr/bin/ironic` (API and conductor in one process,
 * rpc_transport none, noauth, sqlite) on a free loopback port, with the smartnic_ironic
 * plugin installed into a directory of the test's own (driver/ironic/install.sh --target)
 * and put on its PYTHONPATH. XDG_CACHE_HOME points at a fresh directory because
 * stevedore caches entry points there with coarse mtime resolution. Ready means: the log
 * says the conductor started and the API listens, and GET /v1 answers. Stopped by PID.
 *
 * The `baremetal` CLI (python-ironicclient) is what the tests drive; polling goes through
 * the REST API directly because every CLI start costs about a second.
 *
 * ironicCluster runs several conductors on one database instead (JSON-RPC between them).
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { freePort } from './redis.js';
import { run } from './run.js';

const ROOT = fileURLToPath(new URL('../../../', import.meta.url));
/** Ironic's interpreter: the first python3 on PATH may be another one that cannot import ironic. */
export const PYTHON = '/usr/bin/python3';
export const API_VERSION = '1.78'; // the newest python-ironicclient 5.0.1 speaks

export type Conf = Record<string, Record<string, string | number | boolean>>;

/** Installs driver/ironic into `dir` the documented way, without PyPI; returns `dir`. */
export async function installPlugin(dir: string): Promise<string> {
  await run('sh', [path.join(ROOT, 'driver/ironic/install.sh'), '--target', dir], { env: { ...process.env, PYTHON } });
  return dir;
}

/**
 * `--instance-info` arguments naming an image file served at `url` with its SHA-256:
 * Ironic's rule wants a checksum for every image that is not in Glance.
 */
export function imageInfoArgs(url: string, file: string): string[] {
  const sha256 = createHash('sha256').update(fs.readFileSync(file)).digest('hex');
  return ['--instance-info', `image_source=${url}`, '--instance-info', 'image_os_hash_algo=sha256', '--instance-info', `image_os_hash_value=${sha256}`];
}

/**
 * Ironic's `[glance]` and `[agent]` sections for the tests' Glance on Swift, which runs
 * without Keystone: `auth_type = none` with `endpoint_override` gives glanceclient an
 * unauthenticated session on Glance's URL (keystone.get_auth/get_endpoint accept both),
 * and with swift_endpoint_url, swift_account and swift_temp_url_key set, swift_temp_url
 * needs no Keystone either. `image_download_source = swift`: Glance images are read
 * through temp URLs, not copied to the conductor.
 */
export function ironicGlanceConf(glanceUrl: string, swift: { url: string; account: string }, tempUrlKey: string, tempUrlSeconds = 1200): Conf {
  return {
    glance: {
      auth_type: 'none',
      endpoint_override: glanceUrl,
      swift_endpoint_url: swift.url,
      swift_account: swift.account,
      swift_container: 'glance',
      swift_temp_url_key: tempUrlKey,
      swift_temp_url_duration: tempUrlSeconds,
    },
    agent: { image_download_source: 'swift' },
  };
}

export interface IronicSetup {
  dir: string;
  /** Where installPlugin put smartnic_ironic. */
  pluginDir: string;
  /** Sections merged over the defaults below (e.g. `{ smartnic: { driver_url } }`). */
  conf?: Conf;
  /** A directory put first on Ironic's PATH (e.g. a recording `ipmitool` wrapper). */
  pathPrefix?: string;
  /**
   * `all-in-one` (the default): `/usr/bin/ironic`, API and conductor in one process;
   * `conductor`: `/usr/bin/ironic-conductor` only, on a database that exists already
   * (`[database]` in `conf`, another server's: no schema is created).
   */
  role?: 'all-in-one' | 'conductor';
}

export interface IronicNode {
  uuid: string;
  name: string | null;
  provision_state: string;
  target_provision_state: string | null;
  power_state: string | null;
  last_error: string | null;
  deploy_interface: string;
  driver: string;
  driver_info: Record<string, unknown>;
  driver_internal_info: Record<string, unknown>;
  instance_info: Record<string, unknown>;
  reservation: string | null;
  [k: string]: unknown;
}

/** `over` merged over `base`, section by section. */
function mergeConf(base: Conf, over: Conf = {}): Conf {
  const conf: Conf = {};
  for (const [k, v] of Object.entries(base)) conf[k] = { ...v, ...over[k] };
  for (const [k, v] of Object.entries(over)) if (!conf[k]) conf[k] = { ...v };
  return conf;
}

export class IronicServer {
  child: ChildProcess | null = null;
  port = 0;
  readonly confFile: string;
  readonly logFile: string;

  private constructor(
    readonly dir: string,
    private readonly pluginDir: string,
    /** The configuration written to confFile. */
    readonly conf: Conf,
    private readonly pathPrefix?: string,
    readonly role: 'all-in-one' | 'conductor' = 'all-in-one',
  ) {
    this.confFile = path.join(dir, 'ironic.conf');
    this.logFile = path.join(dir, 'ironic.log');
  }

  static async create(s: IronicSetup): Promise<IronicServer> {
    fs.mkdirSync(s.dir, { recursive: true });
    // A caller that must know the URL before the configuration is written (e.g. for
    // [smartnic]heartbeat_url) picks the port itself and passes it as [api]port.
    const port = Number(s.conf?.['api']?.['port'] ?? 0) || (await freePort());
    const base: Conf = {
      DEFAULT: {
        host: 'test-conductor',
        rpc_transport: 'none',
        auth_strategy: 'noauth',
        log_file: path.join(s.dir, 'ironic.log'),
        debug: false,
        enabled_hardware_types: 'fake-hardware,smartnic-ipmi',
        // smartnic-streaming must not be the default of a type that cannot use it
        // (DESIGN.md §5): ipmi is not enabled here, smartnic-ipmi lists it first.
        enabled_deploy_interfaces: 'fake,smartnic-streaming',
        enabled_boot_interfaces: 'fake,pxe',
        enabled_power_interfaces: 'fake,ipmitool',
        enabled_management_interfaces: 'fake,ipmitool,noop',
        enabled_inspect_interfaces: 'no-inspect',
        enabled_network_interfaces: 'noop',
        default_network_interface: 'noop',
        enabled_console_interfaces: 'no-console',
        enabled_raid_interfaces: 'no-raid',
        enabled_vendor_interfaces: 'no-vendor',
        enabled_bios_interfaces: 'no-bios',
      },
      api: { host_ip: '127.0.0.1', port },
      // Conductors sharing this file (ironicCluster) write it at once: a heartbeat holds the
      // lock while another registers. sqlite3 gives up on a locked database after 5 s, which
      // a loaded 2-core machine exceeds; wait up to 60 s instead.
      database: { connection: `sqlite:///${path.join(s.dir, 'ironic.sqlite')}?timeout=60` },
      dhcp: { dhcp_provider: 'none' },
      conductor: {
        automated_clean: false,
        force_power_state_during_sync: false,
        sync_power_state_interval: 10,
        // A stuck wait fails through [smartnic]deploy_timeout first; this is the backstop.
        deploy_callback_timeout: 600,
        check_provision_state_interval: 5,
        node_locked_retry_attempts: 5,
        node_locked_retry_interval: 1,
      },
      ipmi: { min_command_interval: 1, command_retry_timeout: 20 },
      smartnic: { poll_interval: 1, progress_interval: 1, request_timeout: 10 },
    };
    const conf = mergeConf(base, s.conf);
    const srv = new IronicServer(s.dir, s.pluginDir, conf, s.pathPrefix, s.role);
    srv.port = port;
    const text = Object.entries(conf)
      .map(([section, opts]) => `[${section}]\n${Object.entries(opts).map(([k, v]) => `${k} = ${String(v)}`).join('\n')}\n`)
      .join('\n');
    fs.writeFileSync(srv.confFile, text);
    if (srv.role === 'conductor') return srv;
    // `ironic-dbsync upgrade` fails on sqlite; create_schema builds the current schema.
    await run('/usr/bin/ironic-dbsync', ['--config-file', srv.confFile, 'create_schema'], { env: srv.env() });
    return srv;
  }

  get url(): string {
    return `http://127.0.0.1:${this.port}`;
  }

  /** The environment for Ironic and its CLIs. */
  env(): NodeJS.ProcessEnv {
    const cache = path.join(this.dir, 'cache');
    fs.mkdirSync(cache, { recursive: true });
    return {
      ...process.env,
      PYTHONPATH: this.pluginDir,
      ...(this.pathPrefix ? { PATH: `${this.pathPrefix}:${process.env['PATH'] ?? '/usr/bin:/bin'}` } : {}),
      XDG_CACHE_HOME: cache,
      OS_AUTH_TYPE: 'none',
      OS_ENDPOINT: this.url,
      OS_BAREMETAL_API_VERSION: API_VERSION,
      PYTHONWARNINGS: 'ignore',
    };
  }

  async start(timeoutMs = 60_000): Promise<void> {
    const out = fs.openSync(path.join(this.dir, 'ironic.stdout'), 'a');
    const program = this.role === 'conductor' ? '/usr/bin/ironic-conductor' : '/usr/bin/ironic';
    const child = spawn(program, ['--config-file', this.confFile], { env: this.env(), stdio: ['ignore', out, out] });
    fs.closeSync(out);
    this.child = child;
    child.on('error', () => undefined);
    const t0 = Date.now();
    for (;;) {
      if (child.exitCode !== null || child.signalCode !== null) throw new Error(`ironic exited (${child.exitCode ?? child.signalCode}) during start-up:\n${this.logTail(40)}`);
      const log = fs.existsSync(this.logFile) ? fs.readFileSync(this.logFile, 'utf8') : '';
      // The all-in-one process keeps running without an API when the conductor fails to
      // register (a driver that does not load, say): the log tells, not the port.
      if (/ERROR oslo_service\.service|DriverLoadError|ConductorHardwareInterfacesError/.test(log)) {
        await this.stop();
        throw new Error(`ironic failed to start:\n${this.logTail(40, log)}`);
      }
      if (this.role === 'conductor' && log.includes('Created RPC server with')) return;
      if (log.includes('Successfully started conductor') && log.includes('wsgi starting up on')) {
        const ok = await fetch(`${this.url}/v1`).then(
          (r) => r.ok,
          () => false,
        );
        if (ok) return;
      }
      if (Date.now() - t0 > timeoutMs) {
        await this.stop();
        throw new Error(`ironic did not become ready within ${timeoutMs} ms:\n${this.logTail(40, log)}`);
      }
      await new Promise((r) => setTimeout(r, 200));
    }
  }

  /** SIGTERM (escalated to SIGKILL after 10 s); `SIGKILL` simulates a crash (one process: API and conductor, or a conductor). */
  async stop(signal: NodeJS.Signals = 'SIGTERM'): Promise<void> {
    const c = this.child;
    this.child = null;
    if (!c || c.exitCode !== null || c.signalCode !== null) return;
    const exited = new Promise<void>((r) => c.once('exit', () => r()));
    c.kill(signal);
    const timer = setTimeout(() => c.kill('SIGKILL'), 10_000);
    await exited;
    clearTimeout(timer);
  }

  logTail(lines = 30, text?: string): string {
    const log = text ?? (fs.existsSync(this.logFile) ? fs.readFileSync(this.logFile, 'utf8') : '');
    // Without the API's access log, which the tests' polling floods.
    return log
      .split('\n')
      .filter((l) => !l.includes('eventlet.wsgi.server'))
      .slice(-lines)
      .join('\n');
  }

  /** The log lines that mention `what` (a node UUID, say). */
  logLines(what: string): string[] {
    return fs.readFileSync(this.logFile, 'utf8').split('\n').filter((l) => l.includes(what));
  }

  /** Runs `baremetal ARGS…` against this Ironic; rejects with its stderr on failure. */
  /** `baremetal ARGS…`; a failure carries the tail of this server's log (an HTTP 500's cause is only there). */
  async baremetal(...args: string[]): Promise<string> {
    try {
      return (await run('/usr/bin/baremetal', args, { env: this.env(), timeoutMs: 60_000 })).stdout;
    } catch (err) {
      throw new Error(`${(err as Error).message}\n${this.logTail(40)}`);
    }
  }

  /** `baremetal ARGS…` whose failure is an expected outcome. */
  async baremetalResult(...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
    return run('/usr/bin/baremetal', args, { env: this.env(), timeoutMs: 60_000, allowFail: true });
  }

  async api<T>(p: string): Promise<T> {
    const res = await fetch(`${this.url}${p}`, { headers: { 'X-OpenStack-Ironic-API-Version': API_VERSION } });
    if (!res.ok) throw new Error(`GET ${p}: HTTP ${res.status}: ${await res.text()}`);
    return (await res.json()) as T;
  }

  /** PATCH /v1/nodes/{ident} with JSON-patch operations (what `baremetal node set` sends). */
  async patchNode(ident: string, ops: { op: 'add' | 'replace' | 'remove'; path: string; value?: unknown }[]): Promise<IronicNode> {
    const res = await fetch(`${this.url}/v1/nodes/${ident}`, { method: 'PATCH', headers: { 'X-OpenStack-Ironic-API-Version': API_VERSION, 'Content-Type': 'application/json' }, body: JSON.stringify(ops) });
    if (!res.ok) throw new Error(`PATCH /v1/nodes/${ident}: HTTP ${res.status}: ${await res.text()}`);
    return (await res.json()) as IronicNode;
  }

  node(ident: string): Promise<IronicNode> {
    return this.api<IronicNode>(`/v1/nodes/${ident}`);
  }

  /**
   * Waits until the node is in one of `want`. A failure state that is not wanted —
   * `deploy failed`, `error`, `clean failed` — fails at once with the node's last_error.
   */
  async waitForProvisionState(ident: string, want: string | string[], timeoutMs = 60_000): Promise<IronicNode> {
    const wanted = Array.isArray(want) ? want : [want];
    const stuck = ['deploy failed', 'error', 'clean failed', 'inspect failed', 'adopt failed'].filter((s) => !wanted.includes(s));
    const deadline = Date.now() + timeoutMs;
    let node: IronicNode | null = null;
    for (;;) {
      node = await this.node(ident);
      // Not target_provision_state: "wait call-back" and "deploy failed" keep "active".
      if (wanted.includes(node.provision_state)) return node;
      if (stuck.includes(node.provision_state)) {
        throw new Error(`node ${ident} is "${node.provision_state}", waiting for ${wanted.join('/')}: ${node.last_error}`);
      }
      if (Date.now() > deadline) break;
      await new Promise((r) => setTimeout(r, 250));
    }
    throw new Error(`node ${ident} is still "${node.provision_state}" (target ${node.target_provision_state}) after ${timeoutMs} ms, waiting for ${wanted.join('/')}; last_error: ${node.last_error}\n${this.logTail(20)}`);
  }
}

/**
 * Puts the server's SQLite database in WAL mode, for a cluster whose processes all write it.
 * In the default rollback-journal mode, a connection still reading that wants to write
 * while another process commits is answered "database is locked" at once, whatever the
 * busy timeout (SQLite's deadlock avoidance). A clean-clone CI run lost a deploy step to
 * "database is locked" with the busy timeout at 60 s, so most likely to that. In WAL mode
 * a reader does not hold back a writer's commit. (Production Ironic clusters share MySQL
 * or PostgreSQL.)
 */
async function walMode(srv: IronicServer): Promise<void> {
  const url = String(srv.conf['database']?.['connection'] ?? '');
  const m = /^sqlite:\/\/\/([^?]+)/.exec(url);
  if (!m) throw new Error(`not an SQLite database: ${url}`);
  const { stdout } = await run('/usr/bin/python3', ['-c', "import sqlite3, sys; print(sqlite3.connect(sys.argv[1]).execute('PRAGMA journal_mode=WAL').fetchone()[0])", m[1]!]);
  if (stdout.trim() !== 'wal') throw new Error(`SQLite kept journal_mode ${stdout.trim()} for ${m[1]}`);
}

/**
 * Ironic with several conductors on one database, as a deployment with more than one
 * conductor runs: the first of `hosts` is `/usr/bin/ironic` (the API and a conductor, the
 * database's creator), every other `/usr/bin/ironic-conductor`, each with its files in
 * `<dir>/<host>/`. The conductors start first, the API's process last, so that its first
 * hash ring has them all.
 *
 * They talk JSON-RPC (`rpc_transport = json-rpc`, noauth): the API reaches a node's
 * conductor at `http://<its [DEFAULT]host>:<[json_rpc]port>`, the port being the caller's
 * own setting — one port for every conductor. So on one machine each conductor is named by
 * a loopback address of its own (`127.0.0.2`…: `[DEFAULT]host` is an opaque string, and
 * Linux answers on all of 127/8), where its JSON-RPC server listens.
 */
export async function ironicCluster(s: IronicSetup, hosts: string[]): Promise<IronicServer[]> {
  const rpcPort = await freePort();
  const servers: IronicServer[] = [];
  for (const host of hosts) {
    const first = servers[0];
    const own: Conf = {
      DEFAULT: { host, rpc_transport: 'json-rpc' },
      json_rpc: { host_ip: host, port: rpcPort },
      // The others use the first's database and point their CLIs at its API.
      ...(first ? { database: first.conf['database']!, api: first.conf['api']! } : {}),
    };
    const srv = await IronicServer.create({ ...s, dir: path.join(s.dir, host), conf: mergeConf(s.conf ?? {}, own), role: first ? 'conductor' : 'all-in-one' });
    if (!first) await walMode(srv);
    servers.push(srv);
  }
  try {
    for (const srv of [...servers.slice(1), servers[0]!]) await srv.start();
  } catch (err) {
    for (const srv of servers) await srv.stop();
    throw err;
  }
  return servers;
}

/**
 * The configuration of `dpu-agent serve`, declared once: this schema validates the config
 * file (errors name the key), supplies the defaults, and renders the reference table in
 * docs/dpu-agent.md and the key list in `--help`.
 *
 * Secure by default: the API needs a bearer token unless `auth.disabled` says otherwise
 * (a daemon with neither refuses to start), NBD exports are unix sockets unless TCP is
 * allowed, TCP exports speak TLS when `nbd_tls` is set, and disks may only be created on
 * targets under `allowed_targets`.
 */
import { type ConfigProp, type ConfigSchema, ConfigError, loadConfigFile, validateConfig, resolveTokenList } from '../../../common/src/config.js';
import { readCaBundle, readTlsPair, type TlsPair } from '../../../common/src/tls.js';
import { wrap } from '../cli/flags.js';
import { loadNbdTls, type NbdTls, TLS_MODES, type TlsMode } from '../nbd/tls.js';
import { MAX_PROFILE_REGIONS, RECORDING_DEFAULTS } from '../streaming/boot-profile.js';

export interface AgentConfig {
  listen: { host: string; port: number; tls?: { cert: string; key: string } };
  auth: { tokens: string[]; token_file?: string; disabled: boolean };
  state_dir: string;
  export_dir: string;
  allowed_targets: string[];
  tcp_exports_allowed: boolean;
  nbd_tls?: { cert: string; key: string; ca?: string; mode: TlsMode; verify_peer: boolean };
  defaults: {
    region_size: number;
    bandwidth: number;
    hydration_paused: boolean;
    batch_size: number;
    background_request_ms: number;
    hydrate_connections: number;
    max_connections: number;
    retry_deadline_ms: number;
    stall_timeout_ms: number;
    commit_interval_ms: number;
    open_timeout_ms: number;
  };
  boot_profiles: { enabled: boolean; window_ms: number; max_regions: number };
  reopen_interval_ms: number;
  hash_threads: number;
  peers: { max_inflight: number; max_queued: number; serve_bandwidth: number; host_yield_ms: number; ca?: string };
  log_level: 'fatal' | 'error' | 'warn' | 'info' | 'debug' | 'trace' | 'silent';
}

const MiB = 1 << 20;

export const AGENT_CONFIG_SCHEMA: ConfigSchema = {
  type: 'object',
  additionalProperties: false,
  properties: {
    listen: {
      type: 'object',
      description: 'Where the management API listens: HTTP, or HTTPS with `tls`. Peer agents read verified regions from it too (docs/fleet.md).',
      default: {},
      additionalProperties: false,
      properties: {
        host: { type: 'string', minLength: 1, default: '127.0.0.1', description: 'Address to bind; the DPU\'s management interface, never a host-facing one.' },
        port: { type: 'integer', minimum: 0, maximum: 65535, default: 9611, description: 'TCP port; 0 picks a free one (printed in the "listening" line).' },
        tls: {
          type: 'object',
          description: 'Serve the API over HTTPS (TLS 1.2 or later): the driver\'s calls, their bearer tokens, and the regions and peer tokens peer agents read. Absent: plain HTTP, and a warning at start-up when `host` is not a loopback address. The files are checked at start-up. Clients trust the certificate through the driver\'s `agent.ca` and the other agents\' `peers.ca` (or the system\'s CA store).',
          additionalProperties: false,
          required: ['cert', 'key'],
          properties: {
            cert: { type: 'string', minLength: 1, description: 'PEM certificate of the API (with its chain); it must name the host or address in the URL the driver and peers use (driver_info smartnic_agent_url, smartnic_peer_url).' },
            key: { type: 'string', minLength: 1, description: 'Unencrypted PEM private key of `cert`; keep it mode 0600.' },
          },
        },
      },
    },
    auth: {
      type: 'object',
      description: 'Bearer-token authentication of every endpoint but /v1/health. With no token and `disabled` false the agent refuses to start.',
      default: {},
      additionalProperties: false,
      properties: {
        tokens: {
          type: 'array',
          items: { type: 'string', minLength: 16 },
          default: [],
          secret: true,
          description: 'Accepted tokens (16 characters at least). Prefer `token_file`, which keeps them out of the config file.',
        },
        token_file: { type: 'string', minLength: 1, description: 'A file with one token per line (blank lines and # comments ignored); keep it mode 0600.' },
        disabled: { type: 'boolean', default: false, description: 'Turn authentication off (labs only: anyone who reaches the port controls the disks).' },
      },
    },
    state_dir: { type: 'string', minLength: 1, default: '/var/lib/dpu-agent', description: 'Per-disk state under `<state_dir>/disks/<id>/`: the request (spec.json, mode 0600), disk record, region map, lock. Disks found there are resumed at start-up.' },
    export_dir: { type: 'string', minLength: 1, default: '/run/dpu-agent', description: 'Unix sockets of the NBD exports, `<export_dir>/<id>.sock`.' },
    allowed_targets: {
      type: 'array',
      items: { type: 'string', minLength: 1 },
      default: ['/dev/nvme', '/var/lib/dpu-agent/targets/'],
      description: 'Path prefixes a disk\'s target must start with (the path as given and, if it exists, with symlinks resolved); a prefix ending in "/" is a directory.',
    },
    tcp_exports_allowed: { type: 'boolean', default: false, description: 'Allow `export.kind: tcp`. Without `nbd_tls` NBD has no authentication: anyone who reaches the port reads and writes the disk.' },
    nbd_tls: {
      type: 'object',
      description: 'TLS (NBD_OPT_STARTTLS) for TCP exports, as `dpu-agent stream --tls-*`; unix exports are not affected. Absent: TCP exports are plaintext (a warning is logged at start-up). The files are checked at start-up.',
      additionalProperties: false,
      required: ['cert', 'key'],
      properties: {
        cert: { type: 'string', minLength: 1, description: 'PEM certificate the exports present (with its chain); clients connect with `nbds://`.' },
        key: { type: 'string', minLength: 1, description: 'Unencrypted PEM private key of `cert`; keep it mode 0600.' },
        ca: { type: 'string', minLength: 1, description: 'PEM CA certificate(s) that client certificates must chain to; needs `verify_peer`.' },
        mode: { type: 'string', enum: [...TLS_MODES], default: 'require', description: '`require`: a client must start TLS before any other option (NBD_REP_ERR_TLS_REQD otherwise); `allow`: plaintext clients are served too.' },
        verify_peer: { type: 'boolean', default: false, description: 'Require a client certificate signed by `ca` (mutual TLS). Without it TLS encrypts but any client is served.' },
      },
    },
    defaults: {
      type: 'object',
      description: 'Settings of every disk (a create request may override region size and bandwidth).',
      default: {},
      additionalProperties: false,
      properties: {
        region_size: { type: 'integer', minimum: 4096, maximum: 1 << 30, default: MiB, description: 'Region size in bytes, a power of two, when the request gives none.' },
        bandwidth: { type: 'integer', minimum: 0, default: 0, description: 'Background hydration cap in bytes/s when the request has no `hydration` object; 0 for none.' },
        hydration_paused: {
          type: 'boolean',
          default: false,
          description: 'New disks start with background hydration paused unless the request says `hydration.paused`; `PATCH /v1/disks/{id}/hydration` with `{"paused": false}` starts it. For labs and tests that hold the copy back until the host has booted.',
        },
        batch_size: { type: 'integer', minimum: 4096, default: 8 * MiB, description: 'Largest run of regions one background fetch copies, bytes.' },
        background_request_ms: {
          type: 'integer',
          minimum: 0,
          default: 1,
          description: 'A background fetch goes to the origin as HTTP requests of about this many ms of link time each, sized from the measured link rate (64 KiB to 8 MiB), so a host miss waits behind at most that much background data per connection in the link; 0 sends each fetch as one request. Background requests also wait while the host has small reads in flight.',
        },
        hydrate_connections: { type: 'integer', minimum: 1, default: 2, description: 'Background range requests in flight per disk.' },
        max_connections: { type: 'integer', minimum: 2, default: 8, description: 'HTTP connections per disk to its origin at most; those beyond `hydrate_connections` are kept for host reads.' },
        retry_deadline_ms: { type: 'integer', minimum: 1, default: 30_000, description: 'A range read fails (EIO to the host) when no byte arrived for this long across retries.' },
        stall_timeout_ms: { type: 'integer', minimum: 1, default: 10_000, description: 'An attempt is abandoned and retried when the body stops flowing this long.' },
        commit_interval_ms: { type: 'integer', minimum: 10, default: 1000, description: 'Commit the region map at least this often while it changes.' },
        open_timeout_ms: { type: 'integer', minimum: 1, default: 5000, description: 'How long opening a disk waits for its origin to answer (size and identity): past it a create fails with 502, a disk resumed at start-up is listed `failed`.' },
      },
    },
    boot_profiles: {
      type: 'object',
      description: 'Boot profiles (docs/dpu-agent.md, Boot profiles): record the regions a host reads first, in order, while it boots (GET /v1/disks/{id}/boot-profile), and copy a given profile\'s regions first (`boot_profile.replay` of a create request).',
      default: {},
      additionalProperties: false,
      properties: {
        enabled: { type: 'boolean', default: true, description: 'Record and replay boot profiles. false: nothing is recorded, and a create request\'s profile is ignored (`boot_profile.replay.state` says `disabled`).' },
        window_ms: { type: 'integer', minimum: 100, default: RECORDING_DEFAULTS.windowMs, description: 'A recording ends this long after the host\'s first read (a Debian cloud image boots to cloud-init\'s end in 1-2 min under TCG; far less on hardware).' },
        max_regions: { type: 'integer', minimum: 1, maximum: MAX_PROFILE_REGIONS, default: RECORDING_DEFAULTS.maxRegions, description: 'A recording ends once it holds this many regions (4 bytes each while recording; 4 GiB in 1 MiB regions).' },
      },
    },
    reopen_interval_ms: { type: 'integer', minimum: 100, default: 10_000, description: 'A resumed disk that could not be opened (origin unreachable) is retried this often.' },
    hash_threads: {
      type: 'integer',
      minimum: 0,
      maximum: 64,
      default: 2,
      description: 'Worker threads, shared by all disks, that check fetched regions against their manifest (SHA-256, ~1 GB/s each), so hashing never delays the host\'s NBD requests; 0 hashes on the thread that serves them.',
    },
    peers: {
      type: 'object',
      description: 'Serving verified regions to peer agents (GET /v1/disks/{id}/image, docs/fleet.md) — of disks created with peers.token only.',
      default: {},
      additionalProperties: false,
      properties: {
        max_inflight: {
          type: 'integer',
          minimum: 1,
          maximum: 64,
          default: 2,
          description: "Peer reads served at once, across all disks, each held from its read until its answer is sent (at most 16 MiB each). More wait in a queue (peers.max_queued), beyond it they are answered 503 DPU_ERR_BUSY and the peer asks another peer (or, with no wait for peers, the origin). Reads use libuv's thread pool (4 threads unless UV_THREADPOOL_SIZE says otherwise), which the host's flushes and the fetched regions' writes use too: keep it below the pool's size.",
        },
        serve_bandwidth: {
          type: 'integer',
          minimum: 0,
          default: 0,
          description: "Bytes per second sent to peers, over every answer at once; 0: no cap. Set it below the node's uplink (say 90% of it): the host's traffic and the ACKs of the node's own downloads share that link, and serving peers at its full rate delays both (docs/fleet.md).",
        },
        max_queued: {
          type: 'integer',
          minimum: 0,
          maximum: 256,
          default: 8,
          description: 'Peer reads that wait, first come first served, for one of the peers.max_inflight slots (a freed slot goes to the oldest at once, so the upload does not idle between a 503 and the retry); each waits at most 2 s, then is answered 503 DPU_ERR_BUSY. 0: no queue.',
        },
        host_yield_ms: {
          type: 'integer',
          minimum: 0,
          maximum: 60_000,
          default: 10,
          description: "Serving peers yields to the host: a peer read starts, and each 64 KiB piece of an answer is sent, only once the host has had no NBD request in flight on this agent for 1 ms — or after waiting this long, so that a host that never pauses still lets each answer through at 64 KiB per this many ms (a peer gives up on an answer that stalls 5 s or is slower than 2 MiB/s, so keep it well below 100). 0: peers are served whatever the host does.",
        },
        ca: {
          type: 'string',
          minLength: 1,
          description: "PEM CA certificate(s) that peer agents' API certificates (their `listen.tls.cert`) must chain to, for peers whose URL is https://; the certificate must also name the host in the peer's URL. Absent: the system's CA store (and NODE_EXTRA_CA_CERTS). A peer that fails the check is not read from: its regions come from other peers or the origin. Checked at start-up.",
        },
      },
    },
    log_level: { type: 'string', enum: ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'], default: 'info', description: 'pino level of the JSON log on stderr.' },
  },
};

/** Validates a config object (defaults applied) and resolves `auth.token_file`. */
export function parseAgentConfig(raw: unknown, source: string): Readonly<AgentConfig> {
  return finish(validateConfig<AgentConfig>(AGENT_CONFIG_SCHEMA, raw, source), source);
}

/** Reads, validates and resolves a config file; throws ConfigError naming the bad key. */
export function loadAgentConfig(file: string): Readonly<AgentConfig> {
  return finish(loadConfigFile<AgentConfig>(AGENT_CONFIG_SCHEMA, file), file);
}

/** The TLS of TCP exports, from `nbd_tls` (files read and checked); undefined without it. */
export function agentNbdTls(config: Readonly<AgentConfig>, source = 'config'): NbdTls | undefined {
  const t = config.nbd_tls;
  if (!t) return undefined;
  return relabel(source, 'nbd_tls.', () => loadNbdTls({ cert: t.cert, key: t.key, ca: t.ca, mode: t.mode, verifyPeer: t.verify_peer }, (field) => `config key "nbd_tls.${field}"`));
}

/** The API's certificate and key, from `listen.tls` (read and checked); undefined without it. */
export function agentApiTls(config: Readonly<AgentConfig>, source = 'config'): TlsPair | undefined {
  const t = config.listen.tls;
  if (!t) return undefined;
  return relabel(source, 'listen.tls.', () => readTlsPair(t, (field) => `config key "listen.tls.${field}"`));
}

/** The CA bundle peer agents' certificates must chain to, from `peers.ca`; undefined: the system's store. */
export function agentPeerCa(config: Readonly<AgentConfig>, source = 'config'): Buffer | undefined {
  const file = config.peers.ca;
  if (!file) return undefined;
  return relabel(source, 'peers.', () => readCaBundle('ca', file, () => 'config key "peers.ca"'));
}

/** Runs `read`, putting the config's source before a ConfigError's message and `prefix` before its key. */
function relabel<T>(source: string, prefix: string, read: () => T): T {
  try {
    return read();
  } catch (err) {
    if (err instanceof ConfigError) throw new ConfigError(`${source}: ${err.message}`, `${prefix}${err.key ?? ''}`);
    throw err;
  }
}

/** The token list the API accepts: `auth.tokens` plus the lines of `auth.token_file`. */
export function resolveTokens(config: Readonly<AgentConfig>): string[] {
  return resolveTokenList(config.auth);
}

function finish(config: Readonly<AgentConfig>, source: string): Readonly<AgentConfig> {
  if (config.defaults.region_size & (config.defaults.region_size - 1)) {
    throw new ConfigError(`${source}: config key "defaults.region_size" must be a power of two`, 'defaults.region_size');
  }
  if (!config.auth.disabled && resolveTokens(config).length === 0) {
    throw new ConfigError(
      `${source}: config key "auth.tokens" (or "auth.token_file") must give at least one token: the API is authenticated by default. Set "auth.disabled: true" only in a lab`,
      'auth.tokens',
    );
  }
  // The TLS files are readable and fit together, or start-up fails.
  agentNbdTls(config, source);
  agentApiTls(config, source);
  agentPeerCa(config, source);
  return config;
}

/** The config keys as plain text for `--help`: key, default, meaning. */
export function renderConfigHelp(schema: ConfigSchema = AGENT_CONFIG_SCHEMA): string {
  const lines: string[] = [];
  const walk = (props: Record<string, ConfigProp>, prefix: string): void => {
    for (const [k, p] of Object.entries(props)) {
      const nested = p['properties'] as Record<string, ConfigProp> | undefined;
      if (p.type === 'object' && nested) {
        walk(nested, `${prefix}${k}.`);
        continue;
      }
      const def = p.secret ? '' : p.default === undefined ? '' : ` (default ${JSON.stringify(p.default)})`;
      lines.push(`  ${prefix}${k}${def}`, ...wrap(p.description, 92).map((l) => `      ${l}`));
    }
  };
  walk(schema.properties, '');
  return lines.join('\n') + '\n';
}

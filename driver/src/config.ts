/** The driver service's configuration, declared once (see common/src/config.ts). */
import { ConfigError, type ConfigSchema, loadConfigFile, resolveTokenList, validateConfig } from '../../common/src/config.js';
import { readCaBundle } from '../../common/src/tls.js';

export interface DriverConfig {
  listen: { host: string; port: number };
  auth: { tokens: string[]; token_file?: string; disabled: boolean };
  redis: {
    url: string;
    prefix: string;
    allow_eviction: boolean;
    require_persistence: boolean;
    check_interval_ms: number;
    /** Redis Sentinel: the primary is asked of these sentinels, and followed across failovers. */
    sentinel?: { master_name: string; nodes: string[]; username?: string; password?: string; tls: boolean };
    wait_replicas: number;
    wait_timeout_ms: number;
  };
  agent: { token?: string; timeout_ms: number; ca?: string };
  jobs: {
    attach_attempts: number;
    teardown_attempts: number;
    clean_attempts: number;
    backoff_ms: number;
    export_timeout_ms: number;
    monitor_interval_ms: number;
    concurrency: number;
    keep_completed: number;
  };
  bull_board: { enabled: boolean; path: string };
  glance: {
    url?: string;
    headers: Record<string, string>;
    timeout_ms: number;
    download_source: 'auto' | 'swift' | 'glance';
    swift_endpoint_url?: string;
    swift_api_version: string;
    swift_account?: string;
    swift_account_prefix: string;
    swift_container: string;
    swift_temp_url_key?: string;
    swift_temp_url_duration: number;
    swift_store_multiple_containers_seed: number;
  };
  manifests: { enabled: boolean; require: boolean; max_regions: number; attempts: number };
  boot_profiles: { enabled: boolean; history: number; min_share: number; max_regions: number; ttl_days: number; collect_timeout_ms: number };
  peers: { enabled: boolean; max_peers: number; announce_ttl_ms: number; seed_time_ms: number; seeders: number; origin_wait_ms: number; secret?: string };
  reconcile: {
    interval_ms: number;
    remove_orphans: boolean;
    grace_ms: number;
    max_removals: number;
    concurrency: number;
    disk_id_pattern: string;
    agents: { url: string; token?: string }[];
  };
  log_level: string;
  response_validation: 'off' | 'log' | 'strict';
}

export const DRIVER_CONFIG_SCHEMA: ConfigSchema = {
  type: 'object',
  additionalProperties: false,
  properties: {
    listen: {
      type: 'object',
      description: 'Where the REST API listens.',
      default: {},
      additionalProperties: false,
      properties: {
        host: { type: 'string', default: '127.0.0.1', description: 'Address to bind.' },
        port: { type: 'integer', minimum: 0, maximum: 65535, default: 9612, description: 'TCP port; 0 picks a free one.' },
      },
    },
    auth: {
      type: 'object',
      description: 'Bearer-token authentication of the API and of /queues (where the token is the Basic-auth password).',
      default: {},
      additionalProperties: false,
      properties: {
        tokens: { type: 'array', items: { type: 'string', minLength: 16 }, default: [], secret: true, description: 'Accepted tokens (at least 16 characters).' },
        token_file: { type: 'string', description: 'A file with one accepted token per line (added to tokens).' },
        disabled: { type: 'boolean', default: false, description: 'Serve without authentication. Only for tests and labs on loopback.' },
      },
    },
    redis: {
      type: 'object',
      description: 'The Redis that holds queues and deployments.',
      default: {},
      additionalProperties: false,
      properties: {
        url: { type: 'string', pattern: '^rediss?://', default: 'redis://127.0.0.1:6379/0', description: 'redis:// or rediss:// URL (password in the URL is redacted from logs).' },
        prefix: { type: 'string', pattern: '^[a-z0-9_-]+$', default: 'smartnic', description: 'Key prefix for queues and deployment records.' },
        allow_eviction: {
          type: 'boolean',
          default: false,
          description: "Start even though Redis's maxmemory-policy is not noeviction. An evicting Redis drops deployment records and jobs under memory pressure without an error, so by default the service refuses to start on one (docs/operations.md, Redis).",
        },
        require_persistence: {
          type: 'boolean',
          default: false,
          description: 'Refuse to start unless Redis persists its data (appendonly yes, or RDB snapshots: a non-empty save), and when that cannot be checked (CONFIG disabled, as on managed Redis). false: such a Redis is only warned about.',
        },
        check_interval_ms: { type: 'integer', minimum: 0, default: 60000, description: "How often Redis's eviction policy and persistence are checked again while the service runs (a change is logged, /v1/health and the metrics follow it); 0: at start only." },
        sentinel: {
          type: 'object',
          description:
            'Redis Sentinel (docs/operations.md, Redis with Sentinel): the service asks these sentinels which server is the primary, and follows it across failovers. The URL then gives only the credentials, database and scheme (rediss:// for TLS to the servers); its host and port are not used.',
          additionalProperties: false,
          required: ['master_name', 'nodes'],
          properties: {
            master_name: { type: 'string', minLength: 1, description: 'The name the sentinels monitor the primary under (`sentinel monitor <name> …`).' },
            nodes: {
              type: 'array',
              minItems: 1,
              items: { type: 'string', pattern: '^(\\[[0-9a-fA-F:.]+\\]|[^:\\s/]+):[0-9]{1,5}$' },
              description: 'The sentinels, each `host:port` (`[v6addr]:port`); list all of them: any one that answers is enough.',
            },
            username: { type: 'string', description: "The sentinels' ACL user, when they have one." },
            password: { type: 'string', secret: true, description: "The sentinels' own password (`requirepass` in sentinel.conf), when they have one; the servers' password is the URL's." },
            tls: { type: 'boolean', default: false, description: 'Talk TLS to the sentinels too (with rediss:// the servers always are).' },
          },
        },
        wait_replicas: {
          type: 'integer',
          minimum: 0,
          default: 0,
          description:
            "Before the API answers a request that changes something (creating, deleting or renewing the image of a deployment; starting or cancelling a cleaning; deleting a boot profile), wait until this many replicas have the change (Redis WAIT). A failover then cannot lose what the API acknowledged: with Sentinel, set 1 and run two replicas. When fewer confirm within wait_timeout_ms, or the connection to Redis was made again meanwhile, the request is answered 503 DRV_ERR_REDIS_REPLICATION (retryable: the change is kept on the primary; asked for again, it is the same deployment or cleaning). 0: answer at once, as with a single Redis.",
        },
        wait_timeout_ms: { type: 'integer', minimum: 1, default: 1000, description: "How long a request waits for wait_replicas replicas. The API's reads share the connection and wait behind it while the replicas are too few: keep it short." },
      },
    },
    agent: {
      type: 'object',
      description: 'How the service talks to DPU agents.',
      default: {},
      additionalProperties: false,
      properties: {
        token: { type: 'string', secret: true, description: "Bearer token for agents whose node has no driver_info['smartnic_agent_token']." },
        timeout_ms: { type: 'integer', minimum: 100, default: 15000, description: 'Timeout of one agent API call.' },
        ca: {
          type: 'string',
          minLength: 1,
          description: "PEM CA certificate(s) that agents' API certificates (their listen.tls.cert) must chain to, for agents at https:// URLs; the certificate must also name the host in driver_info['smartnic_agent_url']. Absent: the system's CA store (and NODE_EXTRA_CA_CERTS). Checked at start-up.",
        },
      },
    },
    jobs: {
      type: 'object',
      description: 'Job policy.',
      default: {},
      additionalProperties: false,
      properties: {
        attach_attempts: { type: 'integer', minimum: 1, default: 8, description: 'Attempts of an attach job on transient errors (exponential backoff).' },
        teardown_attempts: { type: 'integer', minimum: 1, default: 12, description: 'Attempts of a teardown job on transient errors.' },
        clean_attempts: { type: 'integer', minimum: 1, default: 8, description: 'Attempts of a clean job on transient errors (agent unreachable or 5xx); polls of a running erasure do not count.' },
        backoff_ms: { type: 'integer', minimum: 10, default: 1000, description: 'First backoff delay; doubles per attempt.' },
        export_timeout_ms: { type: 'integer', minimum: 1000, default: 120000, description: 'How long attach waits for the agent to report the export ready.' },
        monitor_interval_ms: { type: 'integer', minimum: 50, default: 2000, description: 'How often a monitor job polls hydration progress (and a clean job its erasure).' },
        concurrency: { type: 'integer', minimum: 1, default: 8, description: 'Jobs one service process runs at once, per queue.' },
        keep_completed: { type: 'integer', minimum: 0, default: 1000, description: 'Completed jobs kept per queue for inspection.' },
      },
    },
    bull_board: {
      type: 'object',
      description: 'The bull-board UI.',
      default: {},
      additionalProperties: false,
      properties: {
        enabled: { type: 'boolean', default: true, description: 'Mount bull-board.' },
        path: { type: 'string', pattern: '^/[a-z0-9/_-]*$', default: '/queues', description: 'Where it is mounted.' },
      },
    },
    glance: {
      type: 'object',
      description: "Glance images and Swift objects as image sources (docs/driver.md, Image sources). The swift_* keys mean what Ironic's [glance] options of the same names mean.",
      default: {},
      additionalProperties: false,
      properties: {
        url: { type: 'string', pattern: '^https?://', description: 'Glance API endpoint, e.g. http://glance:9292. Needed for Glance image ids; the DPU agents must reach it too when they download from the file store.' },
        headers: { type: 'object', additionalProperties: { type: 'string' }, default: {}, secret: true, description: 'Extra headers for Glance requests (e.g. X-Auth-Token); also sent by the agent when it downloads from Glance. Never logged.' },
        timeout_ms: { type: 'integer', minimum: 100, default: 10000, description: 'Timeout of one Glance or Swift request.' },
        download_source: {
          type: 'string',
          enum: ['auto', 'swift', 'glance'],
          default: 'auto',
          description: "Where the agent reads a Glance image: 'swift' a temp URL (Ironic's image_download_source = swift); 'glance' Glance's /v2/images/{id}/file (file store only: Glance refuses ranges elsewhere); 'auto' by the image's locations, or when Glance hides them, by whether Glance serves a range of it.",
        },
        swift_endpoint_url: { type: 'string', pattern: '^https?://', description: 'Swift endpoint, e.g. http://swift:8080 or http://swift:8080/v1/AUTH_<project> (a trailing /v1/<prefix>_x is stripped, and names the account when swift_account is unset).' },
        swift_api_version: { type: 'string', default: 'v1', description: 'Swift API version in temp URLs.' },
        swift_account: { type: 'string', description: 'The account holding the images, e.g. AUTH_<project of Glance>. Default: the one swift_endpoint_url names.' },
        swift_account_prefix: { type: 'string', default: 'AUTH', description: "Reseller prefix of Swift accounts (what is stripped from swift_endpoint_url)." },
        swift_container: { type: 'string', default: 'glance', description: "Glance's container (its swift_store_container)." },
        swift_temp_url_key: { type: 'string', secret: true, description: "The account's X-Account-Meta-Temp-URL-Key; temp URLs are signed with it. Needed for Swift." },
        swift_temp_url_duration: { type: 'integer', minimum: 10, default: 1200, description: 'Seconds a temp URL is valid. Long hydrations renew it when less than a third is left.' },
        swift_store_multiple_containers_seed: { type: 'integer', minimum: 0, maximum: 32, default: 0, description: "Glance's swift_store_multiple_containers_seed: N > 0 means images live in <swift_container>_<first N characters of the id>." },
      },
    },
    manifests: {
      type: 'object',
      description: 'Image manifests (docs/driver.md, Manifests): per-region SHA-256 and zero map of an image, built once per image content and region size by a `manifest` job, cached in Redis and uploaded to every disk of that image, which then verifies every region it fetches.',
      default: {},
      additionalProperties: false,
      properties: {
        enabled: { type: 'boolean', default: true, description: 'Build and upload manifests. false: disks stream unverified.' },
        require: {
          type: 'boolean',
          default: false,
          description: "Create a disk only once its image's manifest is built (every region verified from the first read; the deploy waits for one full read of the image). false: a deploy without a cached manifest streams unverified until it is built. A node's driver_info['smartnic_require_verification'] overrides it.",
        },
        max_regions: { type: 'integer', minimum: 1, maximum: 2000000, default: 1048576, description: 'The largest manifest built, in regions (32 bytes each in Redis and on the agent): 1 Mi regions is a 1 TiB image in 1 MiB regions. A larger image is not verified.' },
        attempts: { type: 'integer', minimum: 1, default: 3, description: 'Attempts of a manifest job when reading the image fails transiently.' },
      },
    },
    boot_profiles: {
      type: 'object',
      description: "Boot profiles (docs/driver.md, Boot profiles): each deployment's agent records the regions its host reads first while booting; the monitor job stores the recording per image content (beside the image's manifest), and the next deployment of the image has those regions copied first, in boot order, from the moment its disk is created.",
      default: {},
      additionalProperties: false,
      properties: {
        enabled: { type: 'boolean', default: true, description: 'Record, keep and replay boot profiles. false: disks are created with recording off and no profile; stored profiles stay until deleted (DELETE /v1/boot-profiles/{id}) or expired.' },
        history: { type: 'integer', minimum: 1, maximum: 50, default: 5, description: 'Recorded boots kept per image; the profile is merged from them (the oldest drops out).' },
        min_share: { type: 'number', minimum: 0, maximum: 1, default: 0.5, description: 'A region is in the profile when at least this share of the kept boots read it (rounded up; at least one boot).' },
        max_regions: { type: 'integer', minimum: 1, maximum: 65536, default: 4096, description: 'Regions kept per recorded boot and per merged profile (the earliest in boot order).' },
        ttl_days: { type: 'integer', minimum: 1, default: 30, description: "An image's profile is forgotten this long after its last boot was stored." },
        collect_timeout_ms: {
          type: 'integer',
          minimum: 1000,
          default: 1_800_000,
          description: 'A deployment whose disk completes while its host boots (recording) keeps its monitor job polling until the recording is done, at most this long after the deployment was created. A host that had read nothing by then has its recording collected by the teardown instead.',
        },
      },
    },
    peers: {
      type: 'object',
      description: "Peer-to-peer regions (docs/fleet.md): disks of the same image content read each other's verified regions before the origin. The service is the tracker: it gives each disk a per-image token and a list of peers. The DPU agents must reach each other's APIs (driver_info smartnic_peer_url, else smartnic_agent_url); only images with a manifest take part.",
      default: {},
      additionalProperties: false,
      properties: {
        enabled: { type: 'boolean', default: false, description: 'Offer disks to peers and hand each the list of its peers. false: every disk reads the origin alone.' },
        max_peers: { type: 'integer', minimum: 1, maximum: 64, default: 8, description: 'Peers in one disk\'s list: same rack (driver_info smartnic_rack) first, then complete disks, then the furthest along.' },
        announce_ttl_ms: { type: 'integer', minimum: 1000, default: 60000, description: 'A hydrating disk stays listed this long after its last monitor poll: a disk whose driver or agent went away drops out by itself. Longer than jobs.monitor_interval_ms.' },
        seed_time_ms: { type: 'integer', minimum: 0, default: 3600000, description: 'A complete disk stays listed (seeding) this long after it completed; 0: not after it completed.' },
        seeders: { type: 'integer', minimum: 1, maximum: 64, default: 1, description: "Disks of an image that copy it from the origin while no complete disk of it is listed (the first to come; another takes a seeder's place when it goes away). The others read from peers and wait origin_wait_ms for a region no peer has: the fleet pulls about this many copies from the origin." },
        origin_wait_ms: { type: 'integer', minimum: 0, maximum: 86400000, default: 30000, description: "A disk that is not a seeder copies only what its peers have while they keep gaining regions; once they have gained none for this long (the seeder died or stalls, or no peer is listed) it reads what they lack from the origin, until they gain again. The host's reads never wait. 0: no waiting (every disk reads the origin for what its peers lack)." },
        secret: { type: 'string', minLength: 16, secret: true, description: 'Key the per-image peer tokens are derived from (HMAC-SHA256 of the image key). Default: a random one made once and kept in Redis (<prefix>:peers:secret); set it when drivers do not share one Redis.' },
      },
    },
    reconcile: {
      type: 'object',
      description: "Reconciling the DPU agents' disks with the deployment records (docs/operations.md, Reconcile): a disk with a driver-style id and no deployment record is an orphan, reported by GET /v1/orphans and smartnic_driver_orphan_disks, and removed (with wipe) only when remove_orphans is set.",
      default: {},
      additionalProperties: false,
      properties: {
        interval_ms: { type: 'integer', minimum: 0, default: 300000, description: 'How often the agents are scanned (one pass at a time across every driver process on the Redis, under a lock); 0: never on a schedule (`smartnic-driver reconcile` still runs a pass).' },
        remove_orphans: { type: 'boolean', default: false, description: 'Delete (and wipe) a disk that has been an orphan for grace_ms. false: orphans are only reported.' },
        grace_ms: { type: 'integer', minimum: 0, default: 3600000, description: 'How long a disk must have been seen as an orphan, by consecutive passes, before it is removed.' },
        max_removals: {
          type: 'integer',
          minimum: 0,
          default: 5,
          description: 'A pass that finds more orphans due for removal than this removes none and logs an error: many at once look like deployment records lost with Redis, whose hosts may still run from the disks (docs/operations.md, Backups, and losing Redis).',
        },
        concurrency: { type: 'integer', minimum: 1, default: 8, description: 'Agents scanned at once.' },
        disk_id_pattern: {
          type: 'string',
          minLength: 1,
          default: '^[a-z0-9][a-z0-9._-]*-[a-z0-9][a-z0-9._-]*$',
          description: "The disk ids reconcile considers the driver's (`<node>-<deployment>`, lower-cased); other disks are never reported or touched. Narrow it when people or other tools create disks on the same agents, e.g. `^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}-` for Ironic node UUIDs.",
        },
        agents: {
          type: 'array',
          default: [],
          secret: true,
          items: {
            type: 'object',
            additionalProperties: false,
            required: ['url'],
            properties: { url: { type: 'string', pattern: '^https?://' }, token: { type: 'string' } },
          },
          description: "Agents scanned besides those the service has used (kept in Redis, so a Redis that lost its data forgets them: list the fleet here so that the disks it left are found). Each `{url, token}`; token default agent.token.",
        },
      },
    },
    log_level: { type: 'string', enum: ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'], default: 'info', description: 'pino level.' },
    response_validation: { type: 'string', enum: ['off', 'log', 'strict'], default: 'off', description: 'Check API responses against openapi/driver.yaml (tests use strict).' },
  },
};

/** Loads (or, for tests, takes) the config; adds token_file tokens; refuses to run unauthenticated by accident. */
export function resolveDriverConfig(source: { file: string } | { object: unknown }): Readonly<DriverConfig> {
  const cfg = 'file' in source ? loadConfigFile<DriverConfig>(DRIVER_CONFIG_SCHEMA, source.file) : validateConfig<DriverConfig>(DRIVER_CONFIG_SCHEMA, source.object, 'config');
  const tokens = resolveTokenList(cfg.auth);
  if (tokens.length === 0 && !cfg.auth.disabled) {
    throw new ConfigError('config key "auth.tokens": no token configured; set auth.tokens or auth.token_file (or auth.disabled: true for a loopback lab)', 'auth.tokens');
  }
  try {
    new RegExp(cfg.reconcile.disk_id_pattern);
  } catch (err) {
    throw new ConfigError(`config key "reconcile.disk_id_pattern" is not a regular expression: ${(err as Error).message}`, 'reconcile.disk_id_pattern');
  }
  if (cfg.peers.announce_ttl_ms <= cfg.jobs.monitor_interval_ms) {
    throw new ConfigError(`config key "peers.announce_ttl_ms" (${cfg.peers.announce_ttl_ms}) must be longer than jobs.monitor_interval_ms (${cfg.jobs.monitor_interval_ms}): every disk would drop out of the peer lists between two polls`, 'peers.announce_ttl_ms');
  }
  const ca = cfg.agent.ca ? readAgentCa(cfg.agent.ca) : null;
  const resolved = Object.freeze({ ...cfg, auth: Object.freeze({ ...cfg.auth, tokens: cfg.auth.disabled ? [] : tokens }) });
  agentCas.set(resolved, ca);
  return resolved;
}

/** agent.ca's bundle; a ConfigError names the key `agent.ca`. */
function readAgentCa(file: string): Buffer {
  return readCaBundle('agent.ca', file, () => 'config key "agent.ca"');
}

/** agent.ca's certificates, read when the config was resolved. */
const agentCas = new WeakMap<object, Buffer | null>();

/** What agents' certificates must chain to (agent.ca); undefined: the system's store. */
export function agentCa(config: Readonly<DriverConfig>): Buffer | undefined {
  if (!agentCas.has(config) && config.agent.ca) {
    // A config not made by resolveDriverConfig (a test's object): read it now.
    agentCas.set(config, readAgentCa(config.agent.ca));
  }
  return agentCas.get(config) ?? undefined;
}

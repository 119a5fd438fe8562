/**
 * How the service reaches Redis: one Redis at `redis.url`, or the primary that Redis
 * Sentinel names (`redis.sentinel`). Every connection the service opens is made here, so
 * the workers, the API, the start-up check and the CLI all follow a failover the same way:
 *
 *  - ioredis asks the sentinels for the primary on each (re)connect, and subscribes to
 *    their `+switch-master` announcements (failoverDetector) so that it leaves a demoted
 *    primary at once instead of at the next error;
 *  - a command answered READONLY (the server it reached is a replica now: a demoted
 *    primary before ioredis noticed) makes the connection reconnect — to the new primary;
 *    on the patient connections the command is sent again there (the job goes on), on the
 *    fail-fast one it fails (the request is answered 503, retryable);
 *  - no sentinel is waited on for more than SENTINEL_COMMAND_TIMEOUT_MS, and the fail-fast
 *    connection answers no later than redis.wait_timeout_ms + 5 s (a hung primary).
 *
 * Three kinds of connection (service.ts says why there are two long-lived ones):
 * `patient` waits out an outage (commands queue), `fail-fast` fails a command at once
 * while Redis is unreachable, and `probe` tries once and never reconnects.
 */
import { Redis, type RedisOptions } from 'ioredis';
import type { DriverConfig } from './config.js';

export type RedisConnectionKind = 'patient' | 'fail-fast' | 'probe';

/** `host:port` or `[v6]:port` as the config schema admits them. */
export function parseHostPort(s: string): { host: string; port: number } {
  const m = /^(?:\[([0-9a-fA-F:.]+)\]|([^:\s/]+)):([0-9]{1,5})$/.exec(s);
  const port = m ? Number(m[3]) : NaN;
  if (!m || port < 1 || port > 65535) throw new Error(`"${s}" is not host:port (e.g. 10.0.0.5:26379, [fd00::5]:26379)`);
  return { host: m[1] ?? m[2]!, port };
}

/** READONLY: the server is a replica now. Reconnect (to whatever the sentinels name) and resend. */
export function reconnectOnReadonly(err: Error): 2 | false {
  return err.message.startsWith('READONLY') ? 2 : false;
}

/** How long a sentinel may take to answer before the next one is asked (one that accepts connections but hangs must not stall a reconnect). */
export const SENTINEL_COMMAND_TIMEOUT_MS = 3000;
/** A fail-fast command's answer time beyond redis.wait_timeout_ms: a hung primary is answered 503, not waited on. */
const FAIL_FAST_MARGIN_MS = 5000;

/** The ioredis options for `cfg` (the URL still gives credentials, database and scheme). */
export function redisOptions(cfg: Readonly<DriverConfig['redis']>, kind: RedisConnectionKind): RedisOptions {
  const base: RedisOptions =
    kind === 'patient'
      ? { maxRetriesPerRequest: null }
      : kind === 'fail-fast'
        ? // Commands sent but not answered are not sent again after a reconnect: after a
          // failover that would run them on another server (a WAIT there counts the new
          // primary's replicas, not the request's write). They fail, the request is answered 503.
          { maxRetriesPerRequest: 1, enableOfflineQueue: false, connectTimeout: 2000, autoResendUnfulfilledCommands: false, commandTimeout: cfg.wait_timeout_ms + FAIL_FAST_MARGIN_MS, keepAlive: 10_000 }
        : { lazyConnect: true, maxRetriesPerRequest: 1, enableOfflineQueue: false, connectTimeout: 3000, commandTimeout: 5000, retryStrategy: () => null };
  base.reconnectOnError = reconnectOnReadonly;
  const s = cfg.sentinel;
  if (!s) return base;
  const tlsToServers = /^rediss:/i.test(cfg.url);
  return {
    ...base,
    name: s.master_name,
    sentinels: s.nodes.map(parseHostPort),
    ...(s.username ? { sentinelUsername: s.username } : {}),
    ...(s.password ? { sentinelPassword: s.password } : {}),
    ...(s.tls ? { sentinelTLS: {} } : {}),
    enableTLSForSentinelMode: tlsToServers,
    sentinelCommandTimeout: SENTINEL_COMMAND_TIMEOUT_MS,
    // A probe gives up when no sentinel answers; the others keep asking.
    ...(kind === 'probe' ? { sentinelRetryStrategy: () => null } : { failoverDetector: true }),
  };
}

export function connectRedis(cfg: Readonly<DriverConfig['redis']>, kind: RedisConnectionKind): Redis {
  const r = new Redis(cfg.url, redisOptions(cfg, kind));
  r.on('ready', () => generations.set(r, connectionGeneration(r) + 1));
  return r;
}

const generations = new WeakMap<Redis, number>();

/**
 * How many times `r` has become ready: it changes whenever the connection was lost and
 * made again — perhaps to another server, after a failover. What a request wrote is
 * confirmed by a WAIT only if the generation did not change between the two.
 */
export function connectionGeneration(r: Redis): number {
  return generations.get(r) ?? 0;
}

/** The Redis URL with any password replaced, for logs and messages. */
export function redactRedisUrl(url: string): string {
  return url.replace(/\/\/([^@/]*)@/, '//REDACTED@');
}

/** Where the service's Redis is, for logs and messages (no secrets). */
export function describeRedis(cfg: Readonly<Pick<DriverConfig['redis'], 'url' | 'sentinel'>>): string {
  if (!cfg.sentinel) return redactRedisUrl(cfg.url);
  const db = /^rediss?:\/\/[^/]*\/(\d+)/i.exec(cfg.url)?.[1] ?? '0';
  return `the primary "${cfg.sentinel.master_name}" of sentinels ${cfg.sentinel.nodes.join(',')} (db ${db})`;
}

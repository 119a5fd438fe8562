/**
 * How the service reaches Redis: one Redis at `redis.url`, or the primary that Redis
 * Sentinel names (`redis.sentinel`). Every connection the service opens is made here, so
 * the workers, the API, the start-up check and the CLI all follow a failover the same way:
 *
 *  - ioredis asks the sentinels for the primary on each (re)connect, and subscribes to
 *    their `+switch-master` announcements (failoverDetector) so that it leaves a demoted
 *    primary at once instead of at the next error;
 *  - a command answered READONLY (the server it reached is a replica now: a demoted
 *    primary before ioredis noticed) makes the connection reconnect — to the new primary —
 *    and send the command again, instead of failing the job or request.
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

/** The ioredis options for `cfg` (the URL still gives credentials, database and scheme). */
export function redisOptions(cfg: Readonly<DriverConfig['redis']>, kind: RedisConnectionKind): RedisOptions {
  const base: RedisOptions =
    kind === 'patient'
      ? { maxRetriesPerRequest: null }
      : kind === 'fail-fast'
        ? { maxRetriesPerRequest: 1, enableOfflineQueue: false, connectTimeout: 2000 }
        : { lazyConnect: true, maxRetriesPerRequest: 1, enableOfflineQueue: false, connectTimeout: 3000, retryStrategy: () => null };
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
    // A probe gives up when no sentinel answers; the others keep asking.
    ...(kind === 'probe' ? { sentinelRetryStrategy: () => null } : { failoverDetector: true }),
  };
}

export function connectRedis(cfg: Readonly<DriverConfig['redis']>, kind: RedisConnectionKind): Redis {
  return new Redis(cfg.url, redisOptions(cfg, kind));
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

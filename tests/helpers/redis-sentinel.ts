/**
 * A real Redis Sentinel deployment for tests: a primary and a replica (redis-server, AOF
 * on, as RedisServer starts them) watched by three sentinels (`redis-server --sentinel`,
 * the same program Debian's redis-sentinel package runs), each on a free loopback port
 * in its own directory, stopped by PID. Quorum 2 of 3, a primary is judged down after
 * `downAfterMs`, so a failover takes a few seconds. Waits are on state the servers and
 * sentinels report (roles, links, the primary's address), never on time alone.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { Redis } from 'ioredis';
import { parseInfo } from '../../driver/src/redis-fitness.js';
import { freePort, RedisServer, waitForPort } from './redis.js';
import { until } from './services.js';

export const MASTER_NAME = 'smartnic';

/** One command on a short-lived connection (none left behind to reconnect). */
async function ask(port: number, ...args: (string | number)[]): Promise<unknown> {
  const c = new Redis({ port, host: '127.0.0.1', lazyConnect: true, maxRetriesPerRequest: 0, retryStrategy: () => null, enableOfflineQueue: false });
  c.on('error', () => undefined);
  try {
    await c.connect();
    return await c.call(String(args[0]), ...args.slice(1).map(String));
  } finally {
    c.disconnect();
  }
}

export class SentinelRedis {
  /** servers[0] starts as the primary. */
  readonly servers: RedisServer[] = [];
  readonly sentinelPorts: number[] = [];
  private readonly sentinels: ChildProcess[] = [];

  private readonly dir: string;

  constructor(
    dir: string,
    private readonly downAfterMs = 1000,
  ) {
    this.dir = path.resolve(dir); // redis-server changes to its `dir` before it opens its log
  }

  /** `host:port` of each sentinel, as redis.sentinel.nodes takes them. */
  get nodes(): string[] {
    return this.sentinelPorts.map((p) => `127.0.0.1:${p}`);
  }

  async start(): Promise<void> {
    const log = (name: string): string[] => ['--logfile', path.join(this.dir, name, 'redis.log')];
    const primary = new RedisServer(path.join(this.dir, 'redis-0'), log('redis-0'));
    await primary.start();
    const replica = new RedisServer(path.join(this.dir, 'redis-1'), [...log('redis-1'), '--replicaof', '127.0.0.1', String(primary.port)]);
    await replica.start();
    this.servers.push(primary, replica);
    await this.replicating(replica);
    for (let i = 0; i < 3; i++) {
      const port = await freePort();
      const dir = path.join(this.dir, `sentinel-${i}`);
      fs.mkdirSync(dir, { recursive: true });
      const conf = path.join(dir, 'sentinel.conf');
      fs.writeFileSync(
        conf,
        [
          `port ${port}`,
          'bind 127.0.0.1',
          `dir ${JSON.stringify(dir)}`,
          `logfile ${JSON.stringify(path.join(dir, 'sentinel.log'))}`,
          `sentinel monitor ${MASTER_NAME} 127.0.0.1 ${primary.port} 2`,
          `sentinel down-after-milliseconds ${MASTER_NAME} ${this.downAfterMs}`,
          `sentinel failover-timeout ${MASTER_NAME} 10000`,
          `sentinel parallel-syncs ${MASTER_NAME} 1`,
          '',
        ].join('\n'),
      );
      const child = spawn('redis-server', [conf, '--sentinel'], { stdio: 'ignore' });
      child.on('error', () => undefined);
      this.sentinels.push(child);
      this.sentinelPorts.push(port);
      await waitForPort(port);
    }
    // Ready for a failover once every sentinel knows the replica and the other two.
    for (const port of this.sentinelPorts) {
      await this.explained(
        until(`sentinel ${port} to see the replica and its peers`, async () => {
          const m = pairs((await ask(port, 'SENTINEL', 'MASTER', MASTER_NAME)) as string[]);
          return m.get('num-slaves') === '1' && m.get('num-other-sentinels') === '2';
        }, 30_000),
      );
    }
  }

  /** The primary the sentinels name now. */
  async primaryPort(): Promise<number> {
    for (const port of this.sentinelPorts) {
      try {
        const r = (await ask(port, 'SENTINEL', 'GET-MASTER-ADDR-BY-NAME', MASTER_NAME)) as string[] | null;
        if (r) return Number(r[1]);
      } catch {
        // that sentinel is down: ask the next
      }
    }
    throw new Error('no sentinel answers');
  }

  server(port: number): RedisServer {
    const s = this.servers.find((x) => x.port === port);
    if (!s) throw new Error(`no server on port ${port}`);
    return s;
  }

  /** Waits until `replica` has finished its sync with its primary. */
  async replicating(replica: RedisServer, timeoutMs = 30_000): Promise<void> {
    await this.explained(
      until(`${replica.port} to replicate`, async () => {
        const info = parseInfo(String(await ask(replica.port, 'INFO', 'replication')));
        return info.get('role') === 'slave' && info.get('master_link_status') === 'up';
      }, timeoutMs),
    );
  }

  /**
   * Waits until the sentinels name a primary other than `oldPort` and that server says it
   * is one: the failover is done.
   */
  async failedOver(oldPort: number, timeoutMs = 60_000): Promise<number> {
    return this.explained(
      until('the sentinels to promote a replica', async () => {
        const port = await this.primaryPort();
        if (port === oldPort) return null;
        const info = parseInfo(String(await ask(port, 'INFO', 'replication')));
        return info.get('role') === 'master' ? port : null;
      }, timeoutMs),
    );
  }

  /** The server's role as it reports it (`master` or `slave`). */
  async role(port: number): Promise<string | undefined> {
    return parseInfo(String(await ask(port, 'INFO', 'replication'))).get('role');
  }

  /**
   * What each server and sentinel logged, the last `lines` lines of each: for a test's
   * failure message, since a failover that does not happen is explained only there.
   */
  private logs(lines = 40): string {
    const names = [...this.servers.map((_, i) => `redis-${i}/redis.log`), ...this.sentinelPorts.map((_, i) => `sentinel-${i}/sentinel.log`)];
    return names
      .map((name) => {
        let text: string;
        try {
          text = fs.readFileSync(path.join(this.dir, name), 'utf8');
        } catch (e) {
          text = `(unreadable: ${(e as Error).message})`;
        }
        return `--- ${name}\n${text.trimEnd().split('\n').slice(-lines).join('\n')}`;
      })
      .join('\n');
  }

  /** `p`, whose failure carries what the servers and sentinels logged. */
  private async explained<T>(p: Promise<T>): Promise<T> {
    try {
      return await p;
    } catch (e) {
      throw new Error(`${(e as Error).message}\n${this.logs()}`);
    }
  }

  async stop(): Promise<void> {
    for (const c of this.sentinels) {
      if (c.exitCode !== null) continue;
      const exited = new Promise((r) => c.once('exit', r));
      c.kill('SIGTERM');
      await exited;
    }
    for (const s of this.servers) await s.stop();
  }
}

/** A flat [k, v, k, v…] reply as a map. */
function pairs(flat: string[]): Map<string, string> {
  const m = new Map<string, string>();
  for (let i = 0; i + 1 < flat.length; i += 2) m.set(flat[i]!, flat[i + 1]!);
  return m;
}

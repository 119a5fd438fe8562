/**
 * Operations (docs/operations.md), with real processes: the driver service refuses to
 * start on a Redis that evicts, warns about (or with require_persistence refuses) one that
 * persists nothing, and says when CONFIG is refused.
 */
import assert from 'node:assert/strict';
import { type ChildProcess, spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { DriverClient } from '../../openapi/clients/driver-client.js';
import { tempDir } from '../helpers/agent.js';
import { freePort, waitForPort } from '../helpers/redis.js';
import { driverService, type ServiceProcess, TOKEN, until } from '../helpers/services.js';

/** A redis-server with the given settings (RedisServer's are the production-like ones). */
async function redisWith(dir: string, args: string[], port?: number): Promise<{ url: string; stop: () => Promise<void> }> {
  fs.mkdirSync(dir, { recursive: true });
  port ??= await freePort();
  const child: ChildProcess = spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--dir', dir, ...args], { stdio: 'ignore' });
  child.on('error', () => undefined);
  await waitForPort(port);
  return {
    url: `redis://127.0.0.1:${port}/0`,
    async stop() {
      if (child.exitCode !== null || child.signalCode !== null) return;
      const exited = new Promise((r) => child.once('exit', r));
      child.kill('SIGTERM');
      await exited;
    },
  };
}

async function getJson<T>(base: string, p: string): Promise<T> {
  const res = await fetch(`${base}${p}`, { headers: { authorization: `Bearer ${TOKEN}` } });
  assert.ok(res.status === 200 || res.status === 503, `${p}: HTTP ${res.status}`);
  return (await res.json()) as T;
}

describe('driver service operations: Redis fitness at start', function () {
  this.timeout(120_000);
  let tmp: { dir: string; cleanup: () => void };
  const stops: (() => Promise<unknown>)[] = [];

  before(() => {
    tmp = tempDir('driver-ops-redis');
  });
  afterEach(async () => {
    while (stops.length) await stops.pop()!();
  });
  after(() => tmp.cleanup());

  const driverOn = async (name: string, redisArgs: string[], redisCfg: Record<string, unknown> = {}): Promise<ServiceProcess> => {
    const redis = await redisWith(path.join(tmp.dir, name), redisArgs);
    stops.push(redis.stop);
    const d = await driverService({ dir: path.join(tmp.dir, name), redisUrl: redis.url, extra: { redis: { url: redis.url, prefix: 'test', ...redisCfg } } });
    stops.push(() => d.stop());
    return d;
  };
  const health = (d: ServiceProcess): Promise<Record<string, string>> => getJson(d.url, '/v1/health');

  it('refuses to start on a Redis with maxmemory-policy allkeys-lru, naming the setting and the fix', async () => {
    const d = await driverOn('lru', ['--maxmemory-policy', 'allkeys-lru', '--appendonly', 'yes']);
    await assert.rejects(d.start(), (e: Error) => {
      assert.match(e.message, /exited \(2\) during start-up/);
      assert.match(e.message, /smartnic-driver: DRV_ERR_REDIS_UNFIT: .*maxmemory-policy allkeys-lru/);
      assert.match(e.message, /CONFIG SET maxmemory-policy noeviction/);
      assert.match(e.message, /redis\.allow_eviction: true/);
      return true;
    });
  });

  it('starts on it with redis.allow_eviction, warning, and reports the policy in health and metrics', async () => {
    const d = await driverOn('lru-allowed', ['--maxmemory-policy', 'allkeys-lru', '--appendonly', 'yes'], { allow_eviction: true });
    await d.start();
    assert.match(d.output, /"level":40.*maxmemory-policy allkeys-lru.*running anyway because redis\.allow_eviction is true/);
    const h = await health(d);
    assert.equal(h['redis_maxmemory_policy'], 'allkeys-lru');
    assert.equal(h['redis_persistence'], 'aof');
    const metrics = await new DriverClient({ baseUrl: d.url, token: TOKEN }).metrics();
    assert.match(metrics, /smartnic_driver_redis_maxmemory_policy\{policy="allkeys-lru"\} 1/);
    assert.match(metrics, /smartnic_driver_redis_persistence\{mode="aof"\} 1/);
  });

  it('warns about a Redis that persists nothing (save "", appendonly no), and starts', async () => {
    const d = await driverOn('volatile', ['--save', '', '--appendonly', 'no']);
    await d.start();
    const warnings = d.output.split('\n').filter((l) => l.includes('"level":40') && l.includes('persists nothing'));
    assert.equal(warnings.length, 1, d.output);
    assert.match(warnings[0]!, /CONFIG SET appendonly yes/);
    const h = await health(d);
    assert.equal(h['redis_persistence'], 'none');
    assert.equal(h['redis_maxmemory_policy'], 'noeviction');
    assert.match(await new DriverClient({ baseUrl: d.url, token: TOKEN }).metrics(), /smartnic_driver_redis_persistence\{mode="none"\} 1/);
  });

  it('refuses that Redis with redis.require_persistence', async () => {
    const d = await driverOn('volatile-required', ['--save', '', '--appendonly', 'no'], { require_persistence: true });
    await assert.rejects(d.start(), /exited \(2\)[\s\S]*DRV_ERR_REDIS_UNFIT: .*persists nothing[\s\S]*redis\.require_persistence is true/);
  });

  it('with CONFIG renamed away (managed Redis), reads INFO instead and says what to verify by hand', async () => {
    const d = await driverOn('no-config', ['--save', '', '--appendonly', 'no', '--rename-command', 'CONFIG', '']);
    await d.start();
    assert.match(d.output, /could not tell whether Redis at redis:\/\/127\.0\.0\.1:\d+\/0 persists its data \(CONFIG GET was refused: .*unknown command.*verify by hand/);
    const h = await health(d);
    assert.equal(h['redis_persistence'], 'unknown');
    assert.equal(h['redis_maxmemory_policy'], 'noeviction', 'read from INFO memory');
    const required = await driverOn('no-config-required', ['--appendonly', 'no', '--rename-command', 'CONFIG', ''], { require_persistence: true });
    await assert.rejects(required.start(), /DRV_ERR_REDIS_UNFIT: .*could not tell whether .*set it to false once verified by hand/);
    const aof = await driverOn('no-config-aof', ['--appendonly', 'yes', '--rename-command', 'CONFIG', ''], { require_persistence: true });
    await aof.start();
    assert.equal((await health(aof))['redis_persistence'], 'aof', 'INFO persistence aof_enabled:1');
  });

  it('unreachable at start: starts, and once Redis answers with an evicting policy logs DRV_ERR_REDIS_UNFIT at error level', async () => {
    const port = await freePort();
    const url = `redis://127.0.0.1:${port}/0`;
    const d = await driverService({ dir: path.join(tmp.dir, 'late'), redisUrl: url, extra: { redis: { url, prefix: 'test', check_interval_ms: 500 } } });
    stops.push(() => d.stop());
    await d.start();
    assert.match(d.output, /Redis is unreachable at start: its eviction policy and persistence are checked once it answers/);
    assert.equal((await health(d))['redis_persistence'], 'unknown');
    const redis = await redisWith(path.join(tmp.dir, 'late'), ['--maxmemory-policy', 'allkeys-lru', '--appendonly', 'yes'], port);
    stops.push(redis.stop);
    await until('the error line', async () => d.output.split('\n').find((l) => l.includes('"level":50') && l.includes('DRV_ERR_REDIS_UNFIT')), 30_000);
    assert.equal((await health(d))['redis_maxmemory_policy'], 'allkeys-lru');
  });
});

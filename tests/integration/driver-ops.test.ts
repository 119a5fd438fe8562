/**
 * Operations (docs/operations.md), with real processes: the driver service refuses to
 * start on a Redis that evicts, warns about (or with require_persistence refuses) one that
 * persists nothing, and says when CONFIG is refused; reconcile reports an orphan disk (made
 * directly on a real DPU agent with a driver-style id) in GET /v1/orphans and the metrics,
 * keeps it by default, and removes (wipes) it with remove_orphans once its grace period
 * is over — driven by `smartnic-driver reconcile` and by the service's own schedule —
 * while a disk a deployment record names is never touched.
 */
import assert from 'node:assert/strict';
import { type ChildProcess, spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { stringify } from 'yaml';
import { AgentClient } from '../../openapi/clients/agent-client.js';
import { type Deployment, DriverClient, type DeploymentCreate } from '../../openapi/clients/driver-client.js';
import { ApiError } from '../../openapi/clients/http.js';
import { makeImage, tempDir } from '../helpers/agent.js';
import { TestOrigin } from '../helpers/origin.js';
import { freePort, RedisServer, waitForPort } from '../helpers/redis.js';
import { run } from '../helpers/run.js';
import { agentDaemon, driverService, type ServiceProcess, TOKEN, until } from '../helpers/services.js';

const MiB = 1 << 20;
const CLI = 'driver/bin/smartnic-driver.js';

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

interface OrphanList {
  removal_held: string | null;
  orphans: { agent_url: string; disk_id: string; state: string; size: number; target: string; first_seen_at: string; last_seen_at: string; remove_after: string | null; last_error: string | null }[];
  agents: { agent_url: string; scanned_at: string; error: string | null }[];
  reconciled_at: string | null;
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

describe('driver service operations: reconcile orphan disks', function () {
  this.timeout(240_000);
  let tmp: { dir: string; cleanup: () => void };
  let origin: TestOrigin;
  let redis: RedisServer;
  let agent: ServiceProcess;
  let driver: ServiceProcess;
  let api: DriverClient;
  let agentApi: AgentClient;
  let deadAgent: string;

  const target = (name: string): string => path.join(tmp.dir, 'agent', 'targets', `${name}.raw`);
  const orphans = (): Promise<OrphanList> => getJson<OrphanList>(driver.url, '/v1/orphans');
  const request = (node: string): DeploymentCreate => ({
    node_uuid: node,
    deployment_id: 'd1',
    instance_info: { image_source: origin.url },
    driver_info: { smartnic_agent_url: agent.url, smartnic_target: target(node) },
  });
  const state = (node: string, want: Deployment['state'][]): Promise<Deployment> =>
    until(`${node} in ${want.join('/')}`, async () => {
      const d = await api.getDeployment(node);
      return want.includes(d.state) ? d : null;
    }, 60_000);
  const onAgent = async (id: string): Promise<boolean> =>
    agentApi.getDisk(id).then(
      () => true,
      (err: unknown) => {
        if (err instanceof ApiError && err.status === 404) return false;
        throw err;
      },
    );
  /** A disk made directly on the agent, as a crash between creating a disk and recording it would leave one. */
  const orphan = async (id: string, name: string): Promise<void> => {
    const d = await agentApi.createDisk({ id, source: { url: origin.url }, target: { path: target(name) } });
    await until(`${id} complete on the agent`, async () => (await agentApi.getDisk(id)).state === 'complete' || d.state === 'complete');
  };
  const cliConfig = (name: string, reconcile: Record<string, unknown>): string => {
    const file = path.join(tmp.dir, `${name}.yaml`);
    fs.writeFileSync(file, stringify({ auth: { tokens: [TOKEN] }, redis: { url: redis.url, prefix: 'test' }, agent: { token: TOKEN, timeout_ms: 5000 }, log_level: 'warn', reconcile }));
    return file;
  };
  const cli = (args: string[]): Promise<{ code: number; stdout: string; stderr: string }> => run(process.execPath, [CLI, ...args], { allowFail: true });

  before(async () => {
    tmp = tempDir('driver-ops');
    const image = path.join(tmp.dir, 'image.raw');
    makeImage(image, 4 * MiB, 9);
    origin = new TestOrigin({ file: image });
    await origin.start();
    redis = new RedisServer(path.join(tmp.dir, 'redis'));
    await redis.start();
    agent = await agentDaemon({ dir: path.join(tmp.dir, 'agent') });
    await agent.start();
    agentApi = new AgentClient({ baseUrl: agent.url, token: TOKEN });
    deadAgent = `http://127.0.0.1:${await freePort()}`;
    // Reports only (the default), on a short schedule; a dead agent listed in the config.
    driver = await driverService({ dir: tmp.dir, redisUrl: redis.url, extra: { reconcile: { interval_ms: 300, agents: [{ url: deadAgent }] } } });
    await driver.start();
    api = new DriverClient({ baseUrl: driver.url, token: TOKEN });
  });
  after(async () => {
    await driver?.stop();
    await agent?.stop();
    await redis?.stop();
    await origin?.stop();
    tmp.cleanup();
  });

  it('health says how Redis persists (the harness runs it with an append-only file)', async () => {
    const h = await getJson<Record<string, string>>(driver.url, '/v1/health');
    assert.equal(h['redis_persistence'], 'aof');
    assert.equal(h['redis_maxmemory_policy'], 'noeviction');
    assert.doesNotMatch(driver.output, /persists nothing|maxmemory-policy/, 'no warning on a fit Redis');
  });

  it('reports a disk no record names in /v1/orphans and the metric, logs it once, and keeps it by default', async () => {
    // A deployment: its agent becomes known to the service, and its disk is never an orphan.
    await api.createDeployment(request('node-r'));
    const kept = await state('node-r', ['complete']);
    await orphan('node-o-d1', 'node-o');
    await agentApi.createDisk({ id: 'scratch', source: { url: origin.url }, target: { path: target('scratch') } }); // not a driver-style id
    const found = await until('the orphan reported', async () => {
      const l = await orphans();
      return l.orphans.length ? l : null;
    });
    assert.deepEqual(found.orphans.map((o) => o.disk_id), ['node-o-d1']);
    const o = found.orphans[0]!;
    assert.equal(o.agent_url, agent.url.replace(/\/+$/, ''));
    assert.equal(o.target, target('node-o'));
    assert.equal(o.size, 4 * MiB);
    assert.equal(o.remove_after, null, 'remove_orphans is off');
    assert.equal(found.removal_held, null);
    assert.ok(found.reconciled_at);
    const scans = Object.fromEntries(found.agents.map((a) => [a.agent_url, a.error]));
    assert.equal(scans[o.agent_url], null);
    assert.match(scans[deadAgent] ?? '', /ECONNREFUSED|UNREACHABLE|connect/i, 'an agent that cannot be listed is named');
    assert.doesNotMatch(JSON.stringify(found), new RegExp(TOKEN), 'no token in the answer');
    assert.match(await api.metrics(), /^smartnic_driver_orphan_disks 1$/m);
    assert.match(await api.metrics(), /^smartnic_driver_reconcile_agents\{result="error"\} 1$/m);
    // Later passes see it again; it stays, and it was logged once.
    await until('two more passes', async () => {
      const l = await orphans();
      return Date.parse(l.orphans[0]!.last_seen_at) > Date.parse(o.first_seen_at) + 1000;
    });
    assert.equal((await orphans()).orphans[0]!.first_seen_at, o.first_seen_at);
    assert.ok(await onAgent('node-o-d1'), 'not removed by default');
    assert.ok(fs.existsSync(target('node-o')));
    const lines = driver.output.split('\n').filter((l) => l.includes('orphan disk: no deployment record names it'));
    assert.equal(lines.length, 1, 'logged once');
    assert.match(lines[0]!, /"disk":"node-o-d1"/);
    assert.doesNotMatch(driver.output, new RegExp(TOKEN), 'no token in the log');
    const unreachable = driver.output.split('\n').filter((l) => l.includes('cannot list the disks') && l.includes(deadAgent));
    assert.equal(unreachable.length, 1, 'an unreachable agent is logged once');
    assert.equal((await api.getDeployment('node-r')).state, 'complete');
    assert.ok(await onAgent(kept.disk_id));
  });

  it('smartnic-driver reconcile removes it (wiped) once the grace period is over, and never a disk a record names', async () => {
    const dry = await cli(['reconcile', '--dry-run', '--config', cliConfig('cli-dry', { remove_orphans: true, grace_ms: 0 })]);
    assert.equal(dry.code, 0, dry.stderr);
    assert.match(dry.stdout, /1 orphan disk\(s\), 0 removed.*\[dry run\]/);
    assert.match(dry.stdout, /orphan {2}http:\/\/127\.0\.0\.1:\d+ {2}node-o-d1 {2}complete/);
    assert.ok(await onAgent('node-o-d1'), 'a dry run removes nothing');

    await orphan('node-p-d1', 'node-p');
    // Two due at once, more than max_removals: none removed, and the pass says why.
    const held = await cli(['reconcile', '--config', cliConfig('cli-held', { remove_orphans: true, grace_ms: 0, max_removals: 1 })]);
    assert.equal(held.code, 0, held.stderr);
    assert.match(held.stdout, /2 orphan disk\(s\), 0 removed/);
    assert.match(held.stdout, /held {4}2 orphan disks are due for removal, more than reconcile\.max_removals \(1\).*lost deployment records/);
    assert.match(held.stderr, /"level":50.*more than reconcile\.max_removals/);
    assert.ok((await onAgent('node-o-d1')) && (await onAgent('node-p-d1')), 'nothing removed while held');
    // Passes until both are gone; each removal must come at least grace_ms after the disk
    // was first seen as an orphan (the removal's log line carries both times).
    const grace = 3000;
    const config = cliConfig('cli-remove', { remove_orphans: true, grace_ms: grace });
    let logs = '';
    await until('both orphans removed by reconcile passes', async () => {
      const r = await cli(['reconcile', '--config', config]);
      if (r.code !== 0) throw new Error(r.stderr);
      logs += r.stderr;
      return !(await onAgent('node-o-d1')) && !(await onAgent('node-p-d1'));
    }, 60_000, 300);
    assert.equal(fs.existsSync(target('node-o')), false, 'wiped');
    assert.equal(fs.existsSync(target('node-p')), false, 'wiped');
    for (const id of ['node-o-d1', 'node-p-d1']) {
      const lines = logs.split('\n').filter((l) => l.includes('orphan disk removed') && l.includes(`"disk":"${id}"`));
      assert.equal(lines.length, 1, `${id} removed once:\n${logs}`);
      const line = JSON.parse(lines[0]!) as { time: number; first_seen_at: string };
      assert.ok(line.time - Date.parse(line.first_seen_at) >= grace, `${id} removed ${line.time - Date.parse(line.first_seen_at)} ms after it was first seen`);
    }
    const l = await until('no orphans left', async () => ((await orphans()).orphans.length === 0 ? true : null));
    assert.ok(l);
    assert.match(await api.metrics(), /^smartnic_driver_orphan_disks 0$/m);
    // What was never the driver's, and what a record names, is untouched.
    assert.ok(await onAgent('scratch'));
    const d = await api.getDeployment('node-r');
    assert.equal(d.state, 'complete');
    assert.ok(await onAgent(d.disk_id));
    assert.ok(fs.existsSync(target('node-r')));
  });

  it('the service removes orphans on its schedule with reconcile.remove_orphans', async () => {
    await driver.stop();
    driver = await driverService({ dir: tmp.dir, redisUrl: redis.url, extra: { reconcile: { interval_ms: 300, remove_orphans: true, grace_ms: 1000 } } });
    await driver.start();
    api = new DriverClient({ baseUrl: driver.url, token: TOKEN });
    await orphan('node-q-d1', 'node-q');
    const listed = await until('node-q-d1 reported with its removal time', async () => (await orphans()).orphans.find((o) => o.disk_id === 'node-q-d1'));
    assert.equal(Date.parse(listed.remove_after!) - Date.parse(listed.first_seen_at), 1000);
    await until('node-q-d1 removed', async () => !(await onAgent('node-q-d1')));
    assert.equal(fs.existsSync(target('node-q')), false, 'wiped');
    assert.match(await api.metrics(), /^smartnic_driver_orphan_disks_removed_total 1$/m);
    assert.ok(await onAgent('scratch'));
    assert.equal((await api.getDeployment('node-r')).state, 'complete');
  });

  it('marks failed a complete deployment whose disk is gone from its agent', async () => {
    const d = await api.getDeployment('node-r');
    await agentApi.deleteDisk(d.disk_id, true);
    const failed = await state('node-r', ['failed']);
    assert.match(failed.last_error!, /no longer has disk node-r-d1 \(found by reconcile\)/);
    await api.deleteDeployment('node-r');
    await until('node-r torn down', async () => api.getDeployment('node-r').then(() => false, (e: unknown) => e instanceof ApiError && e.status === 404));
    assert.deepEqual((await orphans()).orphans, []);
    await agentApi.deleteDisk('scratch', true);
  });
});

/**
 * Cleaning through the driver service, with real processes: redis-server, the DPU agent
 * daemon, the driver service, on a file target and on loop devices. POST
 * /v1/nodes/{node}/cleaning runs a `clean` job that has the agent erase the target and
 * follows it to the end; the record shows state and progress; refusals (a deployment, a
 * cleaning running), a failure with the agent's reason, cancel, and an agent killed
 * mid-erasure (the job erases again).
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { AgentClient } from '../../openapi/clients/agent-client.js';
import { type Cleaning, DriverClient } from '../../openapi/clients/driver-client.js';
import { ApiError } from '../../openapi/clients/http.js';
import { makeImage, tempDir } from '../helpers/agent.js';
import { TestOrigin } from '../helpers/origin.js';
import { RedisServer } from '../helpers/redis.js';
import { run } from '../helpers/run.js';
import { agentDaemon, driverService, type ServiceProcess, TOKEN, until } from '../helpers/services.js';

const MiB = 1 << 20;

function allZero(file: string, size: number): boolean {
  const fd = fs.openSync(file, 'r');
  try {
    const buf = Buffer.alloc(8 * MiB);
    for (let off = 0; off < size; off += buf.length) {
      const n = fs.readSync(fd, buf, 0, Math.min(buf.length, size - off), off);
      for (let i = 0; i < n; i++) if (buf[i] !== 0) return false;
    }
    return true;
  } finally {
    fs.closeSync(fd);
  }
}

function fill(file: string, size: number, byte: number): void {
  const fd = fs.openSync(file, 'r+');
  const buf = Buffer.alloc(8 * MiB, byte);
  for (let off = 0; off < size; off += buf.length) fs.writeSync(fd, buf, 0, Math.min(buf.length, size - off), off);
  fs.fsyncSync(fd);
  fs.closeSync(fd);
}

describe('driver service cleaning with a real agent and Redis', function () {
  this.timeout(300_000);
  let dir: string;
  let cleanup: () => void;
  let origin: TestOrigin;
  let redis: RedisServer;
  let agent: ServiceProcess;
  let driver: ServiceProcess;
  let api: DriverClient;
  let agentApi: AgentClient;
  const loops: string[] = [];
  let small = ''; // 256 MiB
  let big = ''; // 1 GiB

  async function loop(name: string, size: number): Promise<string> {
    const file = path.join(dir, name);
    fs.writeFileSync(file, Buffer.alloc(0));
    fs.truncateSync(file, size);
    const dev = (await run('losetup', ['--find', '--show', file])).stdout.trim();
    loops.push(dev);
    return dev;
  }

  before(async () => {
    ({ dir, cleanup } = tempDir('driver-cleaning'));
    makeImage(path.join(dir, 'image.raw'), 8 * MiB, 2);
    origin = new TestOrigin({ file: path.join(dir, 'image.raw') });
    await origin.start();
    small = await loop('small.img', 256 * MiB);
    big = await loop('big.img', 1024 * MiB);
    redis = new RedisServer(path.join(dir, 'redis'));
    await redis.start();
    agent = await agentDaemon({ dir: path.join(dir, 'agent'), extra: { allowed_targets: [path.join(dir, 'agent', 'targets') + '/', small, big] } });
    driver = await driverService({ dir, redisUrl: redis.url, jobs: { clean_attempts: 4 } });
    await Promise.all([agent.start(), driver.start()]);
    api = new DriverClient({ baseUrl: driver.url, token: TOKEN });
    agentApi = new AgentClient({ baseUrl: agent.url, token: TOKEN });
  });

  after(async () => {
    await driver?.stop();
    await agent?.stop();
    await redis?.stop();
    await origin?.stop();
    for (const d of loops) await run('losetup', ['-d', d], { allowFail: true });
    cleanup?.();
  });

  const target = (name: string): string => path.join(dir, 'agent', 'targets', `${name}.raw`);
  const di = (t: string) => ({ smartnic_agent_url: agent.url, smartnic_target: t });
  const ended = (node: string, timeoutMs = 120_000): Promise<Cleaning> =>
    until(`cleaning of ${node} to end`, async () => {
      const c = await api.getCleaning(node);
      return ['done', 'failed', 'cancelled'].includes(c.state) ? c : null;
    }, timeoutMs);

  it('erase_devices_metadata on a file: a clean job has the agent zero the tables and signatures; visible in the API, the CLI and bull-board', async () => {
    const file = target('meta');
    makeImage(file, 64 * MiB, 6);
    await run('sgdisk', ['-o', '-n', '1:2048:+20M', '-n', '2:0:0', file]);
    const middle = fs.readFileSync(file).subarray(4 * MiB, 18 * MiB);
    const queued = await api.startCleaning('node-m', { step: 'erase_devices_metadata', driver_info: di(file) });
    assert.equal(queued.state, 'queued');
    assert.equal(queued.mode, 'metadata');
    assert.equal(queued.jobs[0]?.queue, 'clean');
    assert.equal(queued.jobs[0]?.id, `clean-node-m-${queued.cleaning_id}`);
    assert.ok(!('driver_info' in queued), 'the request (with the agent token) is not shown');
    const done = await ended('node-m');
    assert.equal(done.state, 'done', done.last_error ?? '');
    assert.equal(done.bytes_done, done.bytes_total);
    assert.equal(done.fraction, 1);
    assert.equal(done.method, 'write');
    assert.equal(done.jobs[0]?.state, 'completed');
    assert.equal((await run('wipefs', [file])).stdout.trim(), '', 'no partition table or signature left');
    assert.ok(fs.readFileSync(file).subarray(4 * MiB, 18 * MiB).equals(middle), 'the data between is untouched');
    const erasure = await agentApi.getErasure(done.erasure_id!);
    assert.equal(erasure.mode, 'metadata');
    assert.equal(erasure.partitions, 2);
    const cli = await run(process.execPath, ['driver/bin/smartnic-driver.js', 'jobs', 'list', '--queue', 'clean', '--config', driver.configFile]);
    assert.match(cli.stdout, new RegExp(`clean-node-m-${done.cleaning_id} {2}completed`));
    const board = await fetch(`${driver.url}/queues/api/queues`, { headers: { authorization: `Basic ${Buffer.from(`x:${TOKEN}`).toString('base64')}` } });
    assert.equal(board.status, 200);
    assert.match(await board.text(), /"name":"clean"/);
  });

  it('erase_devices on a 256 MiB loop device: every byte zero; asking again while it runs returns it, another step is refused', async () => {
    fill(small, 256 * MiB, 0xa5);
    const first = await api.startCleaning('node-f', { step: 'erase_devices', driver_info: di(small) });
    assert.equal(first.mode, 'full');
    const again = await api.startCleaning('node-f', { step: 'erase_devices', driver_info: di(small) });
    assert.equal(again.cleaning_id, first.cleaning_id, 'a repeated request returns the running cleaning');
    await assert.rejects(api.startCleaning('node-f', { step: 'erase_devices_metadata', driver_info: di(small) }), (e: unknown) => e instanceof ApiError && e.status === 409 && e.code === 'DRV_ERR_CONFLICT');
    const done = await ended('node-f');
    assert.equal(done.state, 'done', done.last_error ?? '');
    assert.equal(done.bytes_total, 256 * MiB);
    assert.equal(done.method, 'zeroout');
    assert.ok(allZero(small, 256 * MiB), 'every byte of the device reads zero');
    console.log(`      driver: erase_devices of a 256 MiB loop device: ${Date.parse(done.finished_at!) - Date.parse(done.started_at!)} ms on the agent, ${Date.parse(done.updated_at) - Date.parse(done.created_at)} ms request → done`);
    // A finished cleaning is replaced by the next one.
    const next = await api.startCleaning('node-f', { step: 'erase_devices_metadata', driver_info: di(small) });
    assert.notEqual(next.cleaning_id, first.cleaning_id);
    assert.equal((await ended('node-f')).state, 'done');
  });

  it('is refused while the node has a deployment (its disk uses the target), and a deployment while the node is cleaned', async () => {
    await api.createDeployment({ node_uuid: 'node-d', instance_info: { image_source: origin.url }, driver_info: di(target('node-d')) });
    await assert.rejects(api.startCleaning('node-d', { step: 'erase_devices', driver_info: di(target('node-d')) }), (e: unknown) => e instanceof ApiError && e.status === 409 && e.code === 'DRV_ERR_CONFLICT' && /has deployment/.test(e.message));
    await api.deleteDeployment('node-d');
    await until('deployment gone', async () => api.getDeployment('node-d').then(() => false, (e: unknown) => e instanceof ApiError && e.status === 404));
    fill(big, 1024 * MiB, 0x11);
    await api.startCleaning('node-d', { step: 'erase_devices', driver_info: di(big) });
    await assert.rejects(api.createDeployment({ node_uuid: 'node-d', instance_info: { image_source: origin.url }, driver_info: di(big) }), (e: unknown) => e instanceof ApiError && e.status === 409 && /being cleaned/.test(e.message));
    assert.equal((await ended('node-d')).state, 'done');
  });

  it('a refusal by the agent fails the cleaning at once with the agent\'s reason', async () => {
    const c = await api.startCleaning('node-x', { step: 'erase_devices', driver_info: di('/etc/hostname') });
    const failed = await ended('node-x');
    assert.equal(failed.state, 'failed');
    assert.match(failed.last_error!, /DPU_ERR_TARGET_NOT_ALLOWED/);
    assert.equal(failed.jobs[0]?.state, 'failed');
    assert.equal(failed.jobs[0]?.attempts, 1, 'a permanent refusal is not retried');
    assert.equal(failed.cleaning_id, c.cleaning_id);
  });

  it('DELETE cancels: the cleaning ends cancelled and the agent stops erasing', async () => {
    fill(big, 64 * MiB, 0x22);
    await api.startCleaning('node-c', { step: 'erase_devices', driver_info: di(big) });
    const running = await until('erasure started', async () => {
      const c = await api.getCleaning('node-c');
      return c.erasure_id ? c : null;
    }, 30_000, 20);
    const cancelled = await api.cancelCleaning('node-c');
    assert.equal(cancelled.state, 'cancelled');
    const erasure = await agentApi.getErasure(running.erasure_id!);
    assert.equal(erasure.state, 'failed', 'the agent stopped the erasure');
    assert.equal(erasure.error_code, 'DPU_ERR_ERASE_CANCELLED');
    await new Promise((r) => setTimeout(r, 1000));
    assert.equal((await api.getCleaning('node-c')).state, 'cancelled', 'a late poll does not revive it');
    await assert.rejects(api.getCleaning('node-none'), (e: unknown) => e instanceof ApiError && e.status === 404);
  });

  it('an agent killed mid-erasure: the job finds the erasure interrupted after the restart and erases again to the end', async () => {
    fill(big, 1024 * MiB, 0x33);
    await api.startCleaning('node-k', { step: 'erase_devices', driver_info: di(big) });
    const running = await until('erasure under way', async () => {
      const c = await api.getCleaning('node-k');
      return c.erasure_id && c.state === 'running' ? c : null;
    }, 30_000, 20);
    await agent.stop('SIGKILL');
    const interruptedId = running.erasure_id!;
    await agent.start();
    assert.equal((await agentApi.getErasure(interruptedId)).error_code, 'DPU_ERR_ERASE_INTERRUPTED');
    const done = await ended('node-k');
    assert.equal(done.state, 'done', done.last_error ?? '');
    assert.equal(done.restarts, 1);
    assert.notEqual(done.erasure_id, interruptedId);
    assert.ok(allZero(big, 1024 * MiB), 'every byte of the device reads zero');
  });
});

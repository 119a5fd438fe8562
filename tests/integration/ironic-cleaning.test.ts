/**
 * Ironic's cleaning with the smartnic-streaming deploy interface, on a real Ironic
 * (Debian's 21.4) of its own with `[conductor]automated_clean = true` (the other Ironic
 * tests run with it off), the driver service, the DPU agent daemon and a 256 MiB loop
 * device as the node's DPU target. No ramdisk boots: the clean steps erase_devices_metadata
 * and erase_devices run on the DPU. `[smartnic]wipe_on_teardown = false`, so that after an
 * undeploy only cleaning stands between the tenant's data and the next tenant.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { AgentClient, type Erasure } from '../../openapi/clients/agent-client.js';
import { DriverClient } from '../../openapi/clients/driver-client.js';
import { makeImage, tempDir } from '../helpers/agent.js';
import { API_VERSION, imageInfoArgs, installPlugin, IronicServer, type IronicNode } from '../helpers/ironic.js';
import { TestOrigin } from '../helpers/origin.js';
import { RedisServer } from '../helpers/redis.js';
import { run } from '../helpers/run.js';
import { agentDaemon, driverService, type ServiceProcess, TOKEN, until } from '../helpers/services.js';

const MiB = 1 << 20;
const LOOP_SIZE = 256 * MiB;
const IMAGE_SIZE = 24 * MiB;
const BIG_SIZE = 16384 * MiB;

function readAt(file: string, offset: number, length: number): Buffer {
  const fd = fs.openSync(file, 'r');
  try {
    const buf = Buffer.alloc(length);
    fs.readSync(fd, buf, 0, length, offset);
    return buf;
  } finally {
    fs.closeSync(fd);
  }
}

function allZero(file: string, size: number): boolean {
  for (let off = 0; off < size; off += 8 * MiB) {
    const b = readAt(file, off, Math.min(8 * MiB, size - off));
    if (b.some((x) => x !== 0)) return false;
  }
  return true;
}

function fill(file: string, byte: number): void {
  const fd = fs.openSync(file, 'r+');
  const buf = Buffer.alloc(8 * MiB, byte);
  for (let off = 0; off < LOOP_SIZE; off += buf.length) fs.writeSync(fd, buf, 0, buf.length, off);
  fs.fsyncSync(fd);
  fs.closeSync(fd);
}

describe('Ironic cleans smartnic-streaming nodes on the DPU (real Ironic, automated_clean on)', function () {
  this.timeout(600_000);
  let dir: string;
  let cleanup: () => void;
  let image: string;
  let origin: TestOrigin;
  let redis: RedisServer;
  let agent: ServiceProcess;
  let driver: ServiceProcess;
  let ironic: IronicServer;
  let api: DriverClient;
  let agentApi: AgentClient;
  let loopDev = '';
  let bigDev = ''; // 16 GiB, sparse: an erasure long enough to abort
  let uuid = '';

  before(async () => {
    // A short name: the agent's socket paths under it hold the node's and deployment's ids.
    ({ dir, cleanup } = tempDir('icln'));
    image = path.join(dir, 'image.raw');
    makeImage(image, IMAGE_SIZE, 17);
    origin = new TestOrigin({ file: image });
    await origin.start();
    const backing = path.join(dir, 'dpu-nvme.img');
    fs.writeFileSync(backing, Buffer.alloc(0));
    fs.truncateSync(backing, LOOP_SIZE);
    loopDev = (await run('losetup', ['--find', '--show', backing])).stdout.trim();
    const bigBacking = path.join(dir, 'dpu-nvme-big.img');
    fs.writeFileSync(bigBacking, Buffer.alloc(0));
    fs.truncateSync(bigBacking, BIG_SIZE);
    bigDev = (await run('losetup', ['--find', '--show', bigBacking])).stdout.trim();
    redis = new RedisServer(path.join(dir, 'redis'));
    await redis.start();
    agent = await agentDaemon({ dir: path.join(dir, 'agent'), extra: { allowed_targets: [path.join(dir, 'agent', 'targets') + '/', loopDev, bigDev] } });
    driver = await driverService({ dir, redisUrl: redis.url });
    const pluginDir = path.join(dir, 'plugin');
    await Promise.all([agent.start(), driver.start(), installPlugin(pluginDir)]);
    api = new DriverClient({ baseUrl: driver.url, token: TOKEN });
    agentApi = new AgentClient({ baseUrl: agent.url, token: TOKEN });
    ironic = await IronicServer.create({
      dir: path.join(dir, 'ironic'),
      pluginDir,
      conf: {
        conductor: { automated_clean: true },
        smartnic: { driver_url: driver.url, token: TOKEN, teardown_timeout: 30, wipe_on_teardown: false },
      },
    });
    await ironic.start();
  });

  after(async () => {
    await ironic?.stop();
    await driver?.stop();
    await agent?.stop();
    await redis?.stop();
    await origin?.stop();
    for (const d of [loopDev, bigDev]) if (d) await run('losetup', ['-d', d], { allowFail: true });
    if (process.env['KEEP_TEST_DIRS']) console.log(`      kept ${dir}`);
    else cleanup?.();
  });

  /** Waits for `want`, recording every provision state seen on the way. */
  async function through(want: string, timeoutMs = 120_000): Promise<{ node: IronicNode; seen: string[] }> {
    const seen: string[] = [];
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const node = await ironic.node('node-1');
      if (seen[seen.length - 1] !== node.provision_state) seen.push(node.provision_state);
      if (node.provision_state === want) return { node, seen };
      if (['clean failed', 'deploy failed', 'error'].includes(node.provision_state)) throw new Error(`node is "${node.provision_state}": ${node.last_error}`);
      if (Date.now() > deadline) throw new Error(`node still "${node.provision_state}" after ${timeoutMs} ms (seen ${seen.join(' → ')})\n${ironic.logTail(30)}`);
      await new Promise((r) => setTimeout(r, 100));
    }
  }

  /** The agent's erasures of the loop device that started after `since`. */
  async function erasuresSince(since: number): Promise<Erasure[]> {
    return (await agentApi.listErasures()).filter((e) => e.target.path === loopDev && Date.parse(e.started_at) >= since);
  }

  /** Ironic's log lines saying it executes one of our steps, in order. */
  const executed = (): string[] =>
    ironic
      .logLines(uuid)
      .map((l) => /Executing \{'step': '(erase_devices(?:_metadata)?)', 'priority': (\d+)/.exec(l))
      .filter((m): m is RegExpExecArray => m !== null)
      .map((m) => `${m[1]}@${m[2]}`);

  it('lists the steps with IPA\'s priorities and no ramdisk', async () => {
    const created = JSON.parse(
      await ironic.baremetal('node', 'create', '--name', 'node-1', '--driver', 'fake-hardware', '--deploy-interface', 'smartnic-streaming', '--driver-info', `smartnic_agent_url=${agent.url}`, '--driver-info', `smartnic_target=${loopDev}`, '-f', 'json'),
    ) as IronicNode;
    uuid = created.uuid;
    await ironic.baremetal('node', 'manage', 'node-1');
    await ironic.waitForProvisionState('node-1', 'manageable');
    // The interface's steps as the conductor gets them (Ironic's API only lists a node's
    // cached steps after a cleaning; this asks the plugin as the conductor does).
    const steps = JSON.parse(
      (
        await run(
          '/usr/bin/python3',
          ['-c', 'import json; from smartnic_ironic import deploy; print(json.dumps(sorted(deploy.SmartNICStreamingDeploy().get_clean_steps(None), key=lambda s: s["step"])))'],
          { env: ironic.env() },
        )
      ).stdout,
    ) as { step: string; priority: number; abortable: boolean; requires_ramdisk: boolean; interface: string }[];
    assert.deepEqual(
      steps.map((s) => [s.step, s.priority, s.interface, s.abortable, s.requires_ramdisk]),
      [
        ['erase_devices', 10, 'deploy', true, false],
        ['erase_devices_metadata', 99, 'deploy', true, false],
      ],
    );
  });

  it('provide from manageable runs automated cleaning: metadata (99) then full (10), the previous tenant\'s bytes gone', async () => {
    fill(loopDev, 0x5a); // a previous tenant's data
    const t0 = Date.now();
    await ironic.baremetal('node', 'provide', 'node-1');
    const { node, seen } = await through('available');
    const took = Date.now() - t0;
    assert.ok(seen.includes('clean wait'), `went through clean wait: ${seen.join(' → ')}`);
    assert.deepEqual(executed(), ['erase_devices_metadata@99', 'erase_devices@10']);
    assert.equal(node.last_error, null);
    assert.equal(node.driver_internal_info['smartnic_cleaning'], undefined);
    const erasures = await erasuresSince(t0);
    assert.deepEqual(erasures.map((e) => [e.mode, e.state]), [['metadata', 'done'], ['full', 'done']]);
    assert.ok(allZero(loopDev, LOOP_SIZE), 'every byte of the DPU target reads zero');
    console.log(`      provide → available with automated cleaning (both steps, 256 MiB target): ${took} ms`);
  });

  it('(a) deploy → active, undeploy → automated cleaning runs both steps on the DPU and the target ends zeroed', async () => {
    await ironic.baremetal('node', 'set', 'node-1', ...imageInfoArgs(origin.url, image));
    const t0 = Date.now();
    await ironic.baremetal('node', 'deploy', 'node-1');
    await ironic.waitForProvisionState('node-1', 'active', 60_000);
    const deployMs = Date.now() - t0;
    await until('hydration complete', async () => (await api.getDeployment(uuid)).state === 'complete', 60_000, 200);
    assert.ok(readAt(loopDev, 0, IMAGE_SIZE).equals(fs.readFileSync(image)), 'the tenant\'s image is on the DPU target');

    const t1 = Date.now();
    await ironic.baremetal('node', 'undeploy', 'node-1');
    const { node, seen } = await through('available');
    const undeployMs = Date.now() - t1;
    assert.ok(seen.includes('clean wait'), `went through clean wait: ${seen.join(' → ')}`);
    assert.equal(node.last_error, null);
    assert.deepEqual(executed().slice(-2), ['erase_devices_metadata@99', 'erase_devices@10']);
    const erasures = await erasuresSince(t1);
    assert.deepEqual(erasures.map((e) => [e.mode, e.state]), [['metadata', 'done'], ['full', 'done']]);
    const full = erasures[1]!;
    assert.equal(full.bytes_done, LOOP_SIZE);
    const cleaning = await api.getCleaning(uuid);
    assert.equal(cleaning.step, 'erase_devices');
    assert.equal(cleaning.state, 'done');
    assert.ok(allZero(loopDev, LOOP_SIZE), 'every byte of the DPU target reads zero');
    const fullMs = Date.parse(full.finished_at!) - Date.parse(full.started_at);
    console.log(`      deploy → active: ${deployMs} ms; undeploy → available incl. cleaning: ${undeployMs} ms (full erase of the 256 MiB loop device on the agent: ${fullMs} ms, ${full.method}); deploy → available: ${Date.now() - t0} ms`);
  });

  it('(b) manual cleaning from manageable: `baremetal node clean` with erase_devices_metadata', async () => {
    await ironic.baremetal('node', 'manage', 'node-1');
    await ironic.waitForProvisionState('node-1', 'manageable');
    // A tenant's disk: data, a GPT with two partitions, an ext4 filesystem in the second.
    makeImage(path.join(dir, 'tenant.raw'), LOOP_SIZE, 23);
    await run('dd', [`if=${path.join(dir, 'tenant.raw')}`, `of=${loopDev}`, 'bs=8M', 'conv=fsync', 'status=none']);
    await run('sgdisk', ['-o', '-n', '1:2048:+20M', '-n', '2:0:+20M', loopDev]);
    await run('mkfs.ext4', ['-q', '-F', '-E', `offset=${21 * MiB}`, loopDev, '20M']);
    assert.match((await run('wipefs', [loopDev])).stdout, /gpt/);
    const middle = readAt(loopDev, 4 * MiB, 14 * MiB);
    const t0 = Date.now();
    await ironic.baremetal('node', 'clean', 'node-1', '--clean-steps', '[{"interface": "deploy", "step": "erase_devices_metadata"}]');
    const { node, seen } = await through('manageable');
    const took = Date.now() - t0;
    assert.ok(seen.includes('clean wait'), `went through clean wait: ${seen.join(' → ')}`);
    assert.equal(node.last_error, null);
    const erasures = await erasuresSince(t0);
    assert.deepEqual(erasures.map((e) => [e.mode, e.state, e.partitions]), [['metadata', 'done', 2]]);
    assert.equal((await run('wipefs', [loopDev])).stdout.trim(), '', 'no partition table or signature left');
    assert.equal((await run('blkid', ['-p', '-O', String(21 * MiB), loopDev], { allowFail: true })).stdout.trim(), '', 'the filesystem in the partition is gone too');
    assert.ok(readAt(loopDev, 4 * MiB, 14 * MiB).equals(middle), 'the data between is untouched, as with IPA');
    console.log(`      manual clean (erase_devices_metadata) manageable → manageable: ${took} ms`);
  });

  it('a step the DPU refuses ends in "clean failed" with the agent\'s reason; fixed, the node cleans', async () => {
    const outside = path.join(dir, 'elsewhere.raw'); // not under the agent's allowed_targets
    await ironic.baremetal('node', 'set', 'node-1', '--driver-info', `smartnic_target=${outside}`);
    await ironic.baremetal('node', 'clean', 'node-1', '--clean-steps', '[{"interface": "deploy", "step": "erase_devices"}]');
    const failed = await ironic.waitForProvisionState('node-1', 'clean failed', 60_000);
    assert.match(failed.last_error!, /could not run clean step erase_devices on the DPU target/);
    assert.match(failed.last_error!, /DPU_ERR_TARGET_NOT_ALLOWED/);
    assert.equal(failed.maintenance, true, 'Ironic sets maintenance on a failed clean step');
    await ironic.baremetal('node', 'set', 'node-1', '--driver-info', `smartnic_target=${loopDev}`);
    await ironic.baremetal('node', 'maintenance', 'unset', 'node-1');
    await ironic.baremetal('node', 'manage', 'node-1');
    await ironic.waitForProvisionState('node-1', 'manageable');
    await ironic.baremetal('node', 'clean', 'node-1', '--clean-steps', '[{"interface": "deploy", "step": "erase_devices"}]');
    await through('manageable');
    assert.ok(allZero(loopDev, LOOP_SIZE));
  });

  it('abort during "clean wait" (erase_devices is abortable) stops the erasure on the DPU', async () => {
    await ironic.baremetal('node', 'set', 'node-1', '--driver-info', `smartnic_target=${bigDev}`);
    await ironic.baremetal('node', 'clean', 'node-1', '--clean-steps', '[{"interface": "deploy", "step": "erase_devices"}]');
    await ironic.waitForProvisionState('node-1', 'clean wait', 60_000);
    const running = await until('the erasure under way', async () => {
      const c = await api.getCleaning(uuid);
      return c.state === 'running' && c.erasure_id ? c : null;
    }, 30_000, 100);
    // Through the API rather than the CLI, whose start alone can outlast the erasure.
    const res = await fetch(`${ironic.url}/v1/nodes/${uuid}/states/provision`, {
      method: 'PUT',
      headers: { 'Content-Type': 'application/json', 'X-OpenStack-Ironic-API-Version': API_VERSION },
      body: JSON.stringify({ target: 'abort' }),
    });
    assert.equal(res.status, 202, await res.text());
    const failed = await ironic.waitForProvisionState('node-1', 'clean failed', 60_000);
    assert.match(failed.last_error!, /aborted/);
    const erasure = await until('the erasure stopped', async () => {
      const e = await agentApi.getErasure(running.erasure_id!);
      return e.state !== 'running' ? e : null;
    }, 30_000, 100);
    assert.equal(erasure.state, 'failed');
    assert.equal(erasure.error_code, 'DPU_ERR_ERASE_CANCELLED');
    assert.ok(erasure.bytes_done < BIG_SIZE, 'stopped before the end');
    console.log(`      abort in clean wait: the erasure stopped after ${Math.round(erasure.bytes_done / MiB)} of ${BIG_SIZE / MiB} MiB`);
    assert.equal((await api.getCleaning(uuid)).state, 'cancelled');
    // Ironic enters "clean failed" as the abort is accepted and runs the
    // deploy interface's tear_down_cleaning afterwards, in a worker: the
    // record is dropped once that has cancelled the erasure, not before.
    await until('tear_down_cleaning has dropped the cleaning record', async () =>
      (await ironic.node('node-1')).driver_internal_info['smartnic_cleaning'] === undefined, 30_000, 200);
    await ironic.baremetal('node', 'set', 'node-1', '--driver-info', `smartnic_target=${loopDev}`);
    await ironic.baremetal('node', 'manage', 'node-1');
    await ironic.waitForProvisionState('node-1', 'manageable');
  });
});

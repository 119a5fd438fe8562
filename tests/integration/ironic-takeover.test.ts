/**
 * Conductor take-over (issue #13) on a real Ironic 21.4 with two conductors sharing one
 * database (tests/helpers/ironic.ts, ironicCluster): "survivor" runs the API and a
 * conductor, "deployer" a conductor only. A node whose hash-ring conductor is the deployer
 * is deployed there (ACTIVE, its disk still copying); the deployer is killed (SIGKILL).
 *
 * What Ironic 21.4 then does (conductor/manager.py, common/hash_ring.py): the dead
 * conductor's row stops being touched; once it is older than [conductor]heartbeat_timeout
 * the conductor is offline, and a hash ring rebuilt after that
 * ([DEFAULT]hash_ring_reset_interval) maps its nodes to the survivor. The survivor's
 * _sync_local_state (every [conductor]sync_local_state_interval) finds an ACTIVE node of
 * its own whose conductor_affinity is another conductor's and runs _do_takeover:
 * deploy.prepare, deploy.take_over, then conductor_affinity := survivor. A node the dead
 * conductor left reserved is released first by _check_orphan_nodes.
 *
 * Observed through Ironic's API: /v1/conductors (the deployer no longer alive), the node's
 * `conductor` field (the survivor), and the node's history, where the interface's
 * take_over records who took the node over from whom (Ironic itself records a successful
 * take-over nowhere visible); each conductor's log tells which one did what. Then the
 * survivor keeps showing the copy's progress and undeploys the node: disk wiped, nothing
 * left. No timing is asserted: every wait polls, with a generous deadline.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { AgentClient } from '../../openapi/clients/agent-client.js';
import { DriverClient } from '../../openapi/clients/driver-client.js';
import { ApiError } from '../../openapi/clients/http.js';
import { makeImage, tempDir } from '../helpers/agent.js';
import { imageInfoArgs, installPlugin, ironicCluster, type IronicNode, type IronicServer } from '../helpers/ironic.js';
import { TestOrigin } from '../helpers/origin.js';
import { RedisServer } from '../helpers/redis.js';
import { agentDaemon, driverService, type ServiceProcess, TOKEN, until } from '../helpers/services.js';

const MiB = 1 << 20;
/** Conductor names: loopback addresses, where each one's JSON-RPC server listens. */
const SURVIVOR = '127.0.0.2';
const DEPLOYER = '127.0.0.3';
/**
 * Short, but with room for a stall of a loaded 2-core machine: a live conductor whose
 * heartbeat is late by heartbeat_timeout counts as dead, and its nodes move.
 */
const TAKE_OVER_CONF = {
  DEFAULT: { hash_ring_reset_interval: 5 },
  conductor: { heartbeat_interval: 2, heartbeat_timeout: 20, sync_local_state_interval: 5 },
};
/** The background copy's cap: 16 MiB at 256 KiB/s lasts ~64 s, past the take-over. */
const IMAGE_BYTES = 16 * MiB;
const BANDWIDTH = 256 * 1024;

interface Conductor {
  hostname: string;
  alive: boolean;
}

interface HistoryEvent {
  created_at: string;
  severity: string;
  event_type: string;
  event: string;
  conductor: string;
}

describe('Ironic conductor take-over: the conductor that deployed an active node is killed, another takes it over', function () {
  this.timeout(600_000);
  let dir: string;
  let cleanup: () => void;
  let image: string;
  let origin: TestOrigin;
  let redis: RedisServer;
  let agent: ServiceProcess;
  let driver: ServiceProcess;
  let survivor: IronicServer;
  let deployer: IronicServer;
  let api: DriverClient;
  let agentApi: AgentClient;

  before(async () => {
    ({ dir, cleanup } = tempDir('irt'));
    image = path.join(dir, 'image.raw');
    makeImage(image, IMAGE_BYTES, 13);
    origin = new TestOrigin({ file: image });
    await origin.start();
    redis = new RedisServer(path.join(dir, 'redis'));
    await redis.start();
    agent = await agentDaemon({ dir: path.join(dir, 'agent') });
    driver = await driverService({ dir, redisUrl: redis.url });
    const pluginDir = path.join(dir, 'plugin');
    await Promise.all([agent.start(), driver.start(), installPlugin(pluginDir)]);
    api = new DriverClient({ baseUrl: driver.url, token: TOKEN });
    agentApi = new AgentClient({ baseUrl: agent.url, token: TOKEN });
    const t0 = Date.now();
    [survivor, deployer] = await ironicCluster(
      {
        dir: path.join(dir, 'ironic'),
        pluginDir,
        conf: { ...TAKE_OVER_CONF, smartnic: { driver_url: driver.url, token: TOKEN, deploy_timeout: 120, teardown_timeout: 30 } },
      },
      [SURVIVOR, DEPLOYER],
    );
    console.log(`      two conductors ready in ${Date.now() - t0} ms`);
  });

  after(async () => {
    await survivor?.stop();
    await deployer?.stop();
    await driver?.stop();
    await agent?.stop();
    await redis?.stop();
    await origin?.stop();
    if (process.env['KEEP_TEST_DIRS']) console.log(`      kept ${dir}`);
    else cleanup?.();
  });

  const target = (name: string): string => path.join(dir, 'agent', 'targets', `${name}.raw`);

  const conductors = async (): Promise<Conductor[]> => (await survivor.api<{ conductors: Conductor[] }>('/v1/conductors')).conductors;

  const history = async (uuid: string): Promise<HistoryEvent[]> => (await survivor.api<{ history: HistoryEvent[] }>(`/v1/nodes/${uuid}/history?detail=true`)).history;

  const noDeployment = async (uuid: string): Promise<boolean> => {
    try {
      await api.getDeployment(uuid);
      return false;
    } catch (err) {
      return err instanceof ApiError && err.status === 404;
    }
  };

  /**
   * Enrolls `name` under the first of a fixed series of UUIDs that Ironic's hash ring maps
   * to `host` (the node API's `conductor` field), deleting the others: the ring is a
   * function of the UUID and the conductors' names, so the same UUID every run.
   */
  async function nodeOf(host: string, name: string, driverInfo: Record<string, string | number>): Promise<IronicNode> {
    const info = Object.entries(driverInfo).flatMap(([k, v]) => ['--driver-info', `${k}=${v}`]);
    const mapped: string[] = [];
    for (let i = 1; i <= 32; i++) {
      const uuid = `7a6e0000-0000-4000-8000-${i.toString(16).padStart(12, '0')}`;
      await survivor.baremetal('node', 'create', '--uuid', uuid, '--name', name, '--driver', 'fake-hardware', '--deploy-interface', 'smartnic-streaming', ...info);
      const node = await survivor.node(uuid);
      if (node['conductor'] === host) return node;
      mapped.push(`${uuid} → ${String(node['conductor'])}`);
      await survivor.baremetal('node', 'delete', uuid);
    }
    throw new Error(`no UUID of the series maps to ${host}: ${mapped.join(', ')}`);
  }

  it('the survivor takes the active node over (take_over in the node history), keeps its progress, and undeploys it: disk wiped', async () => {
    await until('both conductors alive', async () => {
      const alive = (await conductors()).filter((c) => c.alive).map((c) => c.hostname);
      return alive.includes(SURVIVOR) && alive.includes(DEPLOYER);
    }, 60_000, 500);
    const name = 'node-t';
    const { uuid } = await nodeOf(DEPLOYER, name, { smartnic_agent_url: agent.url, smartnic_target: target(name), smartnic_bandwidth: BANDWIDTH });
    await survivor.baremetal('node', 'manage', name);
    await survivor.waitForProvisionState(name, 'manageable');
    await survivor.baremetal('node', 'provide', name);
    await survivor.waitForProvisionState(name, 'available');
    await survivor.baremetal('node', 'set', name, ...imageInfoArgs(origin.url, image));
    await survivor.baremetal('node', 'deploy', name);
    const active = await survivor.waitForProvisionState(name, 'active', 120_000);
    assert.equal(active['conductor'], DEPLOYER);
    assert.equal(active.last_error, null);
    // The deployer did the work (its log), the survivor none of it.
    assert.ok(deployer.logLines(uuid).some((l) => /streaming disk of node \S+ is ready; resuming the deploy/.test(l)), 'deployed by the deployer');
    assert.ok(!survivor.logLines(uuid).some((l) => /SmartNIC deployment \S+ of node/.test(l)));
    const deploymentId = active.driver_internal_info['smartnic_deployment'] as string;
    // The copy outlasts the take-over (capped), so the survivor has progress to record.
    const before = await api.getDeployment(uuid);
    assert.ok(before.state !== 'complete', `still copying when the deployer dies (${before.state}, ${before.progress.fraction})`);
    assert.deepEqual((await history(uuid)).filter((e) => e.event_type === 'takeover'), []);

    const t0 = Date.now();
    await deployer.stop('SIGKILL');
    await until('Ironic counts the deployer dead', async () => (await conductors()).some((c) => c.hostname === DEPLOYER && !c.alive), 120_000, 500);
    const dead = Date.now() - t0;
    await until("the node's conductor is the survivor", async () => (await survivor.node(uuid))['conductor'] === SURVIVOR, 60_000, 500);
    const remapped = Date.now() - t0;
    const taken = await until('take_over in the node history', async () => (await history(uuid)).find((e) => e.event_type === 'takeover'), 120_000, 500).catch((err: Error) => {
      throw new Error(`${err.message}\n${survivor.logTail(30)}`);
    });
    console.log(`      after the kill: deployer dead in Ironic's view ${dead} ms, node remapped ${remapped} ms, taken over ${Date.now() - t0} ms`);
    assert.equal(taken.conductor, SURVIVOR);
    assert.equal(taken.severity, 'INFO');
    assert.match(taken.event, new RegExp(`^SmartNIC deployment ${deploymentId} \\((attaching|ready|complete), [\\d.]+% local\\) taken over by conductor ${SURVIVOR.replace(/\./g, '\\.')} from ${DEPLOYER.replace(/\./g, '\\.')}$`));
    // What an operator runs. Not with --long: python-ironicclient 5.0.1 asks for
    // /history/detail, which Ironic 21.4 reads as an event named "detail" (404).
    const listed = JSON.parse(await survivor.baremetal('node', 'history', 'list', name, '-f', 'json')) as Record<string, string>[];
    assert.ok(listed.some((e) => Object.values(e).includes(taken.event)), JSON.stringify(listed));
    const node = await survivor.node(uuid);
    assert.equal(node.provision_state, 'active');
    assert.equal(node.last_error, null);
    assert.equal(node.driver_internal_info['smartnic_deployment'], deploymentId);

    // The survivor records the copy's progress to the end.
    const done = await until('progress complete in node show', async () => {
      const p = (await survivor.node(uuid)).driver_internal_info['smartnic_progress'] as { state?: string; fraction?: number } | undefined;
      return p?.state === 'complete' ? p : null;
    }, 180_000, 500);
    assert.equal(done.fraction, 1);
    assert.ok(survivor.logLines(uuid).some((l) => /Every region of the SmartNIC streaming disk of node \S+ is local/.test(l)), 'recorded by the survivor');
    assert.ok(fs.readFileSync(target(name)).equals(fs.readFileSync(image)), 'the DPU target holds the image');

    // And it undeploys the node: the API routes to it, its tear_down deletes the disk.
    await survivor.baremetal('node', 'undeploy', name);
    const available = await survivor.waitForProvisionState(name, 'available', 120_000);
    assert.equal(available.power_state, 'power off');
    assert.equal(available.driver_internal_info['smartnic_progress'], undefined);
    assert.ok(survivor.logLines(uuid).some((l) => /SmartNIC deployment of node \S+ deleted/.test(l)), 'torn down by the survivor');
    assert.ok(await noDeployment(uuid), 'the driver service has no deployment left');
    assert.equal((await agentApi.listDisks()).length, 0, 'the agent has no disk left');
    assert.equal(fs.existsSync(target(name)), false, 'the target was wiped');
  });
});

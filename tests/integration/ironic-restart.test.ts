/**
 * Ironic restarted mid-deployment (issue #8), with real peers: Debian's ironic 21.4 (API
 * and conductor in one process), redis-server, the DPU agent daemon, the driver service
 * and an HTTP origin. The node waits in "wait call-back" (DEPLOYWAIT) while the disk is
 * being attached; Ironic is killed (SIGKILL) there, the disk becomes ready while Ironic is
 * down — so the driver service's heartbeat push is lost — and Ironic is started again.
 *
 * What Ironic 21.4 does on start-up (conductor/base_manager.py): it clears the
 * reservations its host held, and fails nodes in the states it cannot resume
 * (STUCK_STATES_TREATED_AS_FAIL: deploying, cleaning, deleting…). "wait call-back" is not
 * one of them: the node keeps waiting, and the plugin's periodic poll
 * (_check_deployments, [smartnic]poll_interval) is what resumes it.
 *
 * A gate in front of the agent's API holds the disk creation, so the test decides when
 * the disk becomes ready.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import path from 'node:path';
import { AgentClient } from '../../openapi/clients/agent-client.js';
import { DriverClient } from '../../openapi/clients/driver-client.js';
import { ApiError } from '../../openapi/clients/http.js';
import { makeImage, tempDir } from '../helpers/agent.js';
import { imageInfoArgs, installPlugin, IronicServer, type IronicNode } from '../helpers/ironic.js';
import { TestOrigin } from '../helpers/origin.js';
import { freePort, RedisServer } from '../helpers/redis.js';
import { agentDaemon, driverService, type ServiceProcess, TOKEN, until } from '../helpers/services.js';

const MiB = 1 << 20;
const POLL_S = 2;

/** A pass-through proxy to the agent's API that holds disk creations (POST /v1/disks) until released. */
class AgentGate {
  private readonly server: http.Server;
  private held: (() => void)[] = [];
  holding = false;
  /** Disk creations that reached the gate. */
  creates = 0;
  url = '';

  constructor(private readonly upstream: () => string) {
    this.server = http.createServer((req, res) => {
      const chunks: Buffer[] = [];
      req.on('data', (c: Buffer) => chunks.push(c));
      req.on('end', () => {
        const forward = (): void => {
          const up = new URL(this.upstream());
          const out = http.request({ host: up.hostname, port: up.port, method: req.method, path: req.url, headers: req.headers }, (r) => {
            res.writeHead(r.statusCode ?? 502, r.headers);
            r.pipe(res);
          });
          out.on('error', () => res.destroy());
          out.end(Buffer.concat(chunks));
        };
        if (req.method === 'POST' && req.url === '/v1/disks') {
          this.creates++;
          if (this.holding) {
            this.held.push(forward);
            return;
          }
        }
        forward();
      });
    });
  }

  async start(): Promise<void> {
    await new Promise<void>((r) => this.server.listen(0, '127.0.0.1', r));
    this.url = `http://127.0.0.1:${(this.server.address() as AddressInfo).port}`;
  }

  release(): void {
    this.holding = false;
    for (const f of this.held.splice(0)) f();
  }

  async stop(): Promise<void> {
    this.release();
    this.server.closeAllConnections();
    await new Promise<void>((r) => this.server.close(() => r()));
  }
}

describe('Ironic restarted mid-deployment (SIGKILL in "wait call-back")', function () {
  this.timeout(300_000);
  let dir: string;
  let cleanup: () => void;
  let image: string;
  let origin: TestOrigin;
  let redis: RedisServer;
  let agent: ServiceProcess;
  let driver: ServiceProcess;
  let gate: AgentGate;
  let ironic: IronicServer;
  let api: DriverClient;
  let agentApi: AgentClient;

  before(async () => {
    // A short name: disk ids are long, and each export is a unix socket under this directory.
    ({ dir, cleanup } = tempDir('irr'));
    image = path.join(dir, 'image.raw');
    makeImage(image, 24 * MiB, 9);
    origin = new TestOrigin({ file: image });
    await origin.start();
    redis = new RedisServer(path.join(dir, 'redis'));
    await redis.start();
    agent = await agentDaemon({ dir: path.join(dir, 'agent') });
    driver = await driverService({ dir, redisUrl: redis.url });
    const pluginDir = path.join(dir, 'plugin');
    await Promise.all([agent.start(), driver.start(), installPlugin(pluginDir)]);
    gate = new AgentGate(() => agent.url);
    await gate.start();
    api = new DriverClient({ baseUrl: driver.url, token: TOKEN });
    agentApi = new AgentClient({ baseUrl: agent.url, token: TOKEN });
    const port = await freePort();
    ironic = await IronicServer.create({
      dir: path.join(dir, 'ironic'),
      pluginDir,
      conf: {
        api: { port },
        smartnic: { driver_url: driver.url, token: TOKEN, heartbeat_url: `http://127.0.0.1:${port}`, poll_interval: POLL_S, deploy_timeout: 120, teardown_timeout: 30 },
      },
    });
    await ironic.start();
  });

  after(async () => {
    await ironic?.stop();
    await gate?.stop();
    await driver?.stop();
    await agent?.stop();
    await redis?.stop();
    await origin?.stop();
    if (process.env['KEEP_TEST_DIRS']) console.log(`      kept ${dir}`);
    else cleanup?.();
  });

  // A test that failed half-way must not leave the next one without Ironic or the service.
  beforeEach(async () => {
    gate.release();
    if (!driver.child) await driver.start();
    if (!ironic.child) await ironic.start();
  });

  const target = (name: string): string => path.join(dir, 'agent', 'targets', `${name}.raw`);

  const noDeployment = async (uuid: string): Promise<boolean> => {
    try {
      await api.getDeployment(uuid);
      return false;
    } catch (err) {
      return err instanceof ApiError && err.status === 404;
    }
  };

  /** Jobs of every queue that are still to run or running, from the service's metrics. */
  const pendingJobs = async (): Promise<string[]> =>
    (await api.metrics())
      .split('\n')
      .filter((l) => /^smartnic_driver_jobs\{.*state="(active|waiting|delayed|prioritized)"\} [1-9]/.test(l));

  async function deployingNode(name: string): Promise<string> {
    const created = JSON.parse(
      await ironic.baremetal('node', 'create', '--name', name, '--driver', 'fake-hardware', '--deploy-interface', 'smartnic-streaming', '--driver-info', `smartnic_agent_url=${gate.url}`, '--driver-info', `smartnic_target=${target(name)}`, '-f', 'json'),
    ) as IronicNode;
    await ironic.baremetal('node', 'manage', name);
    await ironic.waitForProvisionState(name, 'manageable');
    await ironic.baremetal('node', 'provide', name);
    await ironic.waitForProvisionState(name, 'available');
    await ironic.baremetal('node', 'set', name, ...imageInfoArgs(origin.url, image));
    gate.holding = true;
    const creates = gate.creates;
    await ironic.baremetal('node', 'deploy', name);
    await ironic.waitForProvisionState(name, 'wait call-back', 30_000);
    await until('the disk creation held at the gate', async () => gate.creates > creates, 20_000, 50);
    assert.equal((await api.getDeployment(created.uuid)).state, 'attaching');
    return created.uuid;
  }

  /** After undeploy: nothing left anywhere. */
  async function nothingLeft(uuid: string, name: string): Promise<void> {
    assert.ok(await noDeployment(uuid), 'the driver service has no deployment left');
    assert.equal((await agentApi.listDisks()).length, 0, 'no orphaned disk or export on the agent');
    assert.equal(fs.existsSync(target(name)), false, 'the target was wiped');
    assert.deepEqual(await until('no pending job', async () => ((await pendingJobs()).length === 0 ? [] : null), 30_000, 250), []);
  }

  it('the heartbeat push is lost while Ironic is down; after the restart the poll resumes the deploy → active, disk = image', async () => {
    const uuid = await deployingNode('node-r1');
    const t0 = Date.now();
    await ironic.stop('SIGKILL');
    // The disk becomes ready while Ironic is down: the push fails (a few attempts, then a warning).
    gate.release();
    await until('ready', async () => (['ready', 'complete'].includes((await api.getDeployment(uuid)).state) ? true : null), 30_000, 100).catch(async (err: Error) => {
      throw new Error(`${err.message}\n${JSON.stringify(await api.getDeployment(uuid), null, 1)}\n${driver.output.slice(-3000)}`);
    });
    await until('the lost push reported', async () => driver.output.includes('could not notify Ironic'), 30_000, 100);
    await ironic.start();
    console.log(`      Ironic down for ${Date.now() - t0} ms`);
    const active = await ironic.waitForProvisionState('node-r1', 'active', 60_000);
    console.log(`      active ${Date.now() - t0} ms after the kill`);
    assert.equal(active.last_error, null);
    assert.equal(active.power_state, 'power on');
    assert.ok(ironic.logLines(uuid).some((l) => /streaming disk of node \S+ is ready; resuming the deploy \(poll\)/.test(l)), 'resumed by the poll');
    // "wait call-back" is not among the states Ironic fails at start-up ("deploying" is).
    assert.ok(!ironic.logLines(uuid).some((l) => /can't be resumed by conductor/.test(l)));

    const done = await until('hydration complete', async () => {
      const d = await api.getDeployment(uuid);
      return d.state === 'complete' ? d : null;
    }, 60_000, 250);
    assert.equal(done.progress.fraction, 1);
    assert.ok(fs.readFileSync(target('node-r1')).equals(fs.readFileSync(image)), 'the DPU target holds the image');
    await until('progress complete in node show', async () => ((await ironic.node('node-r1')).driver_internal_info['smartnic_progress'] as { state?: string } | undefined)?.state === 'complete', 30_000, 500);

    await ironic.baremetal('node', 'undeploy', 'node-r1');
    await ironic.waitForProvisionState('node-r1', 'available', 60_000);
    await nothingLeft(uuid, 'node-r1');
  });

  it('Ironic and the driver service killed together: the deploy still completes, nothing left after undeploy', async () => {
    const uuid = await deployingNode('node-r2');
    // Both die while the attach job is in flight (its disk creation held at the gate).
    const t0 = Date.now();
    await Promise.all([ironic.stop('SIGKILL'), driver.stop('SIGKILL')]);
    gate.release(); // the agent makes the disk; nobody is there to hear about it
    await driver.start();
    api = new DriverClient({ baseUrl: driver.url, token: TOKEN });
    await ironic.start();
    // BullMQ hands the killed worker's job to the new one once its lock expires (30 s);
    // the retried attach must adopt the disk the agent already made, not make a second.
    const active = await ironic.waitForProvisionState('node-r2', 'active', 150_000);
    console.log(`      active ${Date.now() - t0} ms after the kill`);
    assert.equal(active.last_error, null);
    await until('hydration complete', async () => ((await api.getDeployment(uuid)).state === 'complete' ? true : null), 60_000, 250);
    assert.ok(fs.readFileSync(target('node-r2')).equals(fs.readFileSync(image)), 'the DPU target holds the image');
    assert.equal((await agentApi.listDisks()).length, 1, 'one disk for the node');

    await ironic.baremetal('node', 'undeploy', 'node-r2');
    await ironic.waitForProvisionState('node-r2', 'available', 60_000);
    await nothingLeft(uuid, 'node-r2');
  });
});

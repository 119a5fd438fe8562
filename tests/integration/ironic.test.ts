/**
 * The smartnic-streaming deploy interface on a real Ironic (Debian's ironic 21.4, API and
 * conductor in one process), with real peers: redis-server, the DPU agent daemon, the
 * driver service, HTTP image origins, and for the IPMI path ipmi_sim as the BMC of a QEMU
 * host that boots from the agent's export as its NVMe disk. Every operation goes through
 * the `baremetal` CLI as an operator would run it.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import http from 'node:http';
import type { AddressInfo, Socket } from 'node:net';
import path from 'node:path';
import { AgentClient } from '../../openapi/clients/agent-client.js';
import { DriverClient } from '../../openapi/clients/driver-client.js';
import { ApiError } from '../../openapi/clients/http.js';
import { makeImage, tempDir } from '../helpers/agent.js';
import { BOOT_MARKER, buildBootImage, unreadRange } from '../helpers/boot-image.js';
import { imageInfoArgs, installPlugin, IronicServer, type IronicNode } from '../helpers/ironic.js';
import { TestOrigin } from '../helpers/origin.js';
import { freePort, RedisServer } from '../helpers/redis.js';
import { run } from '../helpers/run.js';
import { agentDaemon, driverService, type ServiceProcess, TOKEN, until } from '../helpers/services.js';
import { VirtualBmc } from '../helpers/vbmc.js';

const MiB = 1 << 20;
const DEPLOY_TIMEOUT_S = 10;

/**
 * A DPU agent that is up but hangs: it answers its health check (so validation passes)
 * and holds every disk creation open forever; it has no disks, so a delete is a 404.
 */
class HungAgent {
  private readonly server = http.createServer((req, res) => {
    if (req.method === 'GET' && req.url === '/v1/health') {
      res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ status: 'ok', version: 'hung', disks: 0 }));
    } else if (req.method === 'DELETE') {
      res.writeHead(404, { 'content-type': 'application/json' }).end(JSON.stringify({ code: 'DPU_ERR_NOT_FOUND', message: 'no such disk', retryable: false }));
    } else {
      req.resume(); // and never answer
    }
  });
  private readonly sockets = new Set<Socket>();
  url = '';

  async start(): Promise<void> {
    this.server.on('connection', (s) => {
      this.sockets.add(s);
      s.on('close', () => this.sockets.delete(s));
    });
    await new Promise<void>((r) => this.server.listen(0, '127.0.0.1', r));
    this.url = `http://127.0.0.1:${(this.server.address() as AddressInfo).port}`;
  }

  async stop(): Promise<void> {
    for (const s of this.sockets) s.destroy();
    await new Promise<void>((r) => this.server.close(() => r()));
  }
}

describe('Ironic deploys with smartnic-streaming (real Ironic, driver service, agent)', function () {
  this.timeout(300_000);
  let dir: string;
  let cleanup: () => void;
  let image: string;
  let origin: TestOrigin;
  let redis: RedisServer;
  let agent: ServiceProcess;
  let driver: ServiceProcess;
  let hung: HungAgent;
  let ironic: IronicServer;
  let api: DriverClient;
  let agentApi: AgentClient;

  before(async () => {
    ({ dir, cleanup } = tempDir('ironic'));
    image = path.join(dir, 'image.raw');
    makeImage(image, 24 * MiB, 7);
    origin = new TestOrigin({ file: image });
    await origin.start();
    hung = new HungAgent();
    await hung.start();
    redis = new RedisServer(path.join(dir, 'redis'));
    await redis.start();
    agent = await agentDaemon({ dir: path.join(dir, 'agent') });
    driver = await driverService({ dir, redisUrl: redis.url });
    const pluginDir = path.join(dir, 'plugin');
    await Promise.all([agent.start(), driver.start(), installPlugin(pluginDir)]);
    api = new DriverClient({ baseUrl: driver.url, token: TOKEN });
    agentApi = new AgentClient({ baseUrl: agent.url, token: TOKEN });
    ironic = await IronicServer.create({
      dir: path.join(dir, 'ironic'),
      pluginDir,
      conf: { smartnic: { driver_url: driver.url, token: TOKEN, deploy_timeout: DEPLOY_TIMEOUT_S, teardown_timeout: 30 } },
    });
    const t0 = Date.now();
    await ironic.start();
    console.log(`      ironic ready in ${Date.now() - t0} ms`);
  });

  after(async () => {
    await ironic?.stop();
    await driver?.stop();
    await agent?.stop();
    await redis?.stop();
    await hung?.stop();
    await origin?.stop();
    if (process.env['KEEP_TEST_DIRS']) console.log(`      kept ${dir}`);
    else cleanup?.();
  });

  const target = (name: string): string => path.join(dir, 'agent', 'targets', `${name}.raw`);

  /** enroll → manage → provide: an available node. */
  async function availableNode(name: string, args: string[], driverInfo: Record<string, string | number>): Promise<string> {
    const info = Object.entries(driverInfo).flatMap(([k, v]) => ['--driver-info', `${k}=${v}`]);
    const created = JSON.parse(await ironic.baremetal('node', 'create', '--name', name, ...args, ...info, '-f', 'json')) as IronicNode;
    assert.equal(created.provision_state, 'enroll');
    await ironic.baremetal('node', 'manage', name);
    await ironic.waitForProvisionState(name, 'manageable');
    await ironic.baremetal('node', 'provide', name);
    await ironic.waitForProvisionState(name, 'available');
    return created.uuid;
  }

  const fakeNode = (name: string, driverInfo: Record<string, string | number>): Promise<string> =>
    availableNode(name, ['--driver', 'fake-hardware', '--deploy-interface', 'smartnic-streaming'], driverInfo);

  const noDeployment = async (uuid: string): Promise<boolean> => {
    try {
      await api.getDeployment(uuid);
      return false;
    } catch (err) {
      return err instanceof ApiError && err.status === 404;
    }
  };

  it('loads the plugin: the deploy interface and the smartnic-ipmi hardware type', async () => {
    const log = fs.readFileSync(ironic.logFile, 'utf8');
    assert.match(log, /Loaded the following deploy interfaces: \[[^\]]*'smartnic-streaming'/);
    assert.match(log, /Loaded the following hardware types: \[[^\]]*'smartnic-ipmi'/);
    const props = JSON.parse(await ironic.baremetal('driver', 'property', 'list', 'smartnic-ipmi', '-f', 'json')) as { Property: string; Description: string }[];
    const names = props.map((p) => p.Property);
    for (const p of ['smartnic_agent_url', 'smartnic_target', 'smartnic_agent_token', 'smartnic_region_size', 'smartnic_bandwidth']) assert.ok(names.includes(p), `driver property ${p}`);
    assert.match(props.find((p) => p.Property === 'smartnic_agent_url')!.Description, /Required/);
  });

  it('(a) fake-hardware: deploy → active with progress shown, undeploy → available with the disk wiped', async () => {
    const uuid = await fakeNode('node-a', { smartnic_agent_url: agent.url, smartnic_target: target('node-a') });
    await ironic.baremetal('node', 'set', 'node-a', ...imageInfoArgs(origin.url, image));
    const validate = await ironic.baremetal('node', 'validate', 'node-a', '-f', 'json');
    const deployIface = (JSON.parse(validate) as { Interface: string; Result: boolean; Reason: string }[]).find((r) => r.Interface === 'deploy')!;
    assert.equal(deployIface.Result, true, deployIface.Reason);

    const t0 = Date.now();
    await ironic.baremetal('node', 'deploy', 'node-a');
    const active = await ironic.waitForProvisionState('node-a', 'active', 60_000);
    console.log(`      fake-hardware: deploy → active in ${Date.now() - t0} ms`);
    assert.equal(active.power_state, 'power on');
    assert.equal(active.last_error, null);
    // It went through "wait call-back" and the periodic poll resumed it.
    assert.ok(ironic.logLines(uuid).some((l) => /streaming disk of node \S+ is ready; resuming the deploy/.test(l)));

    // The migration stays visible in `baremetal node show` until every region is local.
    const shown = await until('progress complete in node show', async () => {
      const n = JSON.parse(await ironic.baremetal('node', 'show', 'node-a', '--fields', 'driver_internal_info', '-f', 'json')) as IronicNode;
      const p = n.driver_internal_info['smartnic_progress'] as { state: string; fraction: number; regions_local: number; regions_total: number } | undefined;
      return p?.state === 'complete' ? p : null;
    }, 30_000, 500);
    assert.equal(shown.fraction, 1);
    assert.equal(shown.regions_local, shown.regions_total);
    assert.equal((await api.getDeployment(uuid)).state, 'complete');
    assert.ok(fs.readFileSync(target('node-a')).equals(fs.readFileSync(image)), 'the DPU target holds the image');

    await ironic.baremetal('node', 'undeploy', 'node-a');
    const available = await ironic.waitForProvisionState('node-a', 'available', 60_000);
    assert.equal(available.power_state, 'power off');
    assert.equal(available.driver_internal_info['smartnic_progress'], undefined);
    assert.ok(await noDeployment(uuid), 'the driver service has no deployment left');
    assert.equal((await agentApi.listDisks()).length, 0, 'the agent has no disk left');
    assert.equal(fs.existsSync(target('node-a')), false, 'the target was wiped');
  });

  it('(f) a config drive in both forms the CLI sends (JSON dict: Ironic builds it; a directory: the client does) and root_gb reach the disk', async () => {
    // A whole-disk image with a GPT, as cloud images have.
    const gptImage = path.join(dir, 'gpt.raw');
    fs.writeFileSync(gptImage, Buffer.alloc(0));
    fs.truncateSync(gptImage, 24 * MiB);
    await run('sgdisk', ['-o', '-n', '1:2048:+4M', '-t', '1:ef00', '-n', '2:0:0', gptImage]);
    const gptOrigin = new TestOrigin({ file: gptImage });
    await gptOrigin.start();
    const cdDir = path.join(dir, 'cd-dir', 'openstack', 'latest');
    fs.mkdirSync(cdDir, { recursive: true });
    fs.writeFileSync(path.join(cdDir, 'meta_data.json'), JSON.stringify({ uuid: 'node-f', public_keys: { k: 'ssh-ed25519 AAAAdir' } }));
    fs.writeFileSync(path.join(cdDir, 'user_data'), '#cloud-config\nruncmd: [echo FROM-DIR]\n');
    const forms: [string, string][] = [
      ['dict', JSON.stringify({ meta_data: { public_keys: { k: 'ssh-ed25519 AAAAdict' } }, user_data: '#cloud-config\nruncmd: [echo FROM-DICT]\n', network_data: { links: [], networks: [], services: [] } })],
      ['dir', path.join(dir, 'cd-dir')],
    ];
    try {
      for (const [form, arg] of forms) {
        const name = `node-f-${form}`;
        const uuid = await fakeNode(name, { smartnic_agent_url: agent.url, smartnic_target: target(name) });
        await ironic.baremetal('node', 'set', name, ...imageInfoArgs(gptOrigin.url, gptImage), '--instance-info', 'root_gb=1');
        await ironic.baremetal('node', 'deploy', name, '--config-drive', arg);
        await ironic.waitForProvisionState(name, 'active', 60_000);
        const disk = (await agentApi.listDisks()).find((d) => d.target.path === target(name))!;
        assert.equal(disk.size, 1 << 30, `${form}: the disk is root_gb`);
        assert.equal(disk.device.serial, uuid.replace(/-/g, '').slice(0, 20), 'the NVMe serial is the node\'s');
        const cd = disk.config_drive!;
        assert.ok(cd, `${form}: a config drive on the disk`);
        assert.equal(cd.table, 'gpt');
        // Read the ISO back from the DPU's target, as the host's cloud-init would find it.
        const isoFile = path.join(dir, `${name}.iso`);
        const fd = fs.openSync(target(name), 'r');
        const buf = Buffer.alloc(cd.bytes);
        fs.readSync(fd, buf, 0, cd.bytes, cd.offset);
        fs.closeSync(fd);
        fs.writeFileSync(isoFile, buf);
        const label = await run('isoinfo', ['-d', '-i', isoFile]);
        assert.match(label.stdout, /Volume id: config-2/);
        const userData = await run('isoinfo', ['-R', '-x', '/openstack/latest/user_data', '-i', isoFile]);
        assert.match(userData.stdout, form === 'dict' ? /FROM-DICT/ : /FROM-DIR/);
        const meta = JSON.parse((await run('isoinfo', ['-R', '-x', '/openstack/latest/meta_data.json', '-i', isoFile])).stdout) as { uuid?: string };
        if (form === 'dict') assert.equal(meta.uuid, uuid, 'Ironic fills in the node\'s uuid');
        await ironic.baremetal('node', 'undeploy', name);
        await ironic.waitForProvisionState(name, 'available', 60_000);
        assert.equal(fs.existsSync(target(name)), false, 'the target was wiped');
      }
    } finally {
      await gptOrigin.stop();
    }
  });

  it('(g) rebuild deploys a new disk with the new config drive, the old one wiped first; adopt takes a served disk and refuses without one', async () => {
    const gptImage = path.join(dir, 'gpt-g.raw');
    fs.writeFileSync(gptImage, Buffer.alloc(0));
    fs.truncateSync(gptImage, 24 * MiB);
    await run('sgdisk', ['-o', '-n', '1:2048:+4M', '-t', '1:ef00', '-n', '2:0:0', gptImage]);
    const gptOrigin = new TestOrigin({ file: gptImage });
    await gptOrigin.start();
    const drive = (marker: string): string => JSON.stringify({ user_data: `#cloud-config\nruncmd: [echo ${marker}]\n` });
    try {
      // Rebuild.
      const uuid = await fakeNode('node-g', { smartnic_agent_url: agent.url, smartnic_target: target('node-g') });
      await ironic.baremetal('node', 'set', 'node-g', ...imageInfoArgs(gptOrigin.url, gptImage), '--instance-info', 'root_gb=1');
      await ironic.baremetal('node', 'deploy', 'node-g', '--config-drive', drive('FIRST'));
      await ironic.waitForProvisionState('node-g', 'active', 60_000);
      const first = await api.getDeployment(uuid);
      const firstDrive = (await agentApi.listDisks()).find((d) => d.target.path === target('node-g'))!.config_drive!;
      await ironic.baremetal('node', 'rebuild', 'node-g', '--config-drive', drive('SECOND'));
      await ironic.waitForProvisionState('node-g', 'active', 60_000);
      const second = await api.getDeployment(uuid);
      assert.notEqual(second.deployment_id, first.deployment_id, 'a new deployment');
      const disks = (await agentApi.listDisks()).filter((d) => d.target.path === target('node-g'));
      assert.equal(disks.length, 1, 'the old disk is gone');
      assert.equal(disks[0]!.id, second.disk_id);
      assert.notEqual(disks[0]!.config_drive!.sha256, firstDrive.sha256, 'the new config drive');
      assert.ok(ironic.logLines(uuid).some((l) => /Removing the earlier SmartNIC deployment/.test(l)), 'the old deployment was removed (and wiped) first');
      await ironic.baremetal('node', 'undeploy', 'node-g');
      await ironic.waitForProvisionState('node-g', 'available', 60_000);

      // Adopt: a host already running from a disk the service serves.
      const created = JSON.parse(await ironic.baremetal('node', 'create', '--name', 'node-adopt', '--driver', 'fake-hardware', '--deploy-interface', 'smartnic-streaming', '--driver-info', `smartnic_agent_url=${agent.url}`, '--driver-info', `smartnic_target=${target('node-adopt')}`, '-f', 'json')) as IronicNode;
      await ironic.baremetal('node', 'set', 'node-adopt', ...imageInfoArgs(gptOrigin.url, gptImage));
      await ironic.baremetal('node', 'manage', 'node-adopt');
      await ironic.waitForProvisionState('node-adopt', 'manageable');
      await api.createDeployment({ node_uuid: created.uuid, deployment_id: 'pre-existing', instance_info: { image_source: gptOrigin.url }, driver_info: { smartnic_agent_url: agent.url, smartnic_target: target('node-adopt') } });
      await until('pre-existing deployment ready', async () => ['ready', 'complete'].includes((await api.getDeployment(created.uuid)).state), 60_000, 250);
      await ironic.baremetal('node', 'adopt', 'node-adopt');
      const adopted = await ironic.waitForProvisionState('node-adopt', 'active', 60_000);
      assert.equal(adopted.driver_internal_info['smartnic_deployment'], 'pre-existing');
      // The node's history says so (baremetal node history list).
      const events = (await ironic.api<{ history: { event: string; event_type: string }[] }>(`/v1/nodes/${created.uuid}/history?detail=true`)).history;
      assert.ok(events.some((e) => e.event_type === 'adoption' && /^SmartNIC deployment pre-existing \((ready|complete), [\d.]+% local\) adopted by conductor test-conductor$/.test(e.event)), JSON.stringify(events));
      await ironic.baremetal('node', 'undeploy', 'node-adopt');
      await ironic.waitForProvisionState('node-adopt', 'available', 60_000);
      assert.ok(await noDeployment(created.uuid), 'undeploy removed the adopted deployment');

      // Adopt without one: refused, saying why.
      const lone = JSON.parse(await ironic.baremetal('node', 'create', '--name', 'node-lone', '--driver', 'fake-hardware', '--deploy-interface', 'smartnic-streaming', '--driver-info', `smartnic_agent_url=${agent.url}`, '--driver-info', `smartnic_target=${target('node-lone')}`, '-f', 'json')) as IronicNode;
      await ironic.baremetal('node', 'set', 'node-lone', ...imageInfoArgs(gptOrigin.url, gptImage));
      await ironic.baremetal('node', 'manage', 'node-lone');
      await ironic.waitForProvisionState('node-lone', 'manageable');
      await ironic.baremetal('node', 'adopt', 'node-lone');
      const failed = await ironic.waitForProvisionState('node-lone', 'adopt failed', 60_000);
      assert.match(failed.last_error ?? '', /has no deployment of it/);
      assert.ok(await noDeployment(lone.uuid));
    } finally {
      await gptOrigin.stop();
    }
  });

  it('(b) a missing image is refused at deploy time with the origin\'s answer; the node stays available', async () => {
    const missing = new TestOrigin({ file: image, notFound: true });
    await missing.start();
    try {
      const uuid = await fakeNode('node-b', { smartnic_agent_url: agent.url, smartnic_target: target('node-b') });
      await ironic.baremetal('node', 'set', 'node-b', ...imageInfoArgs(missing.url, image));
      const res = await ironic.baremetalResult('node', 'deploy', 'node-b');
      assert.notEqual(res.code, 0);
      assert.match(res.stderr, /instance_info\.image_source/);
      assert.match(res.stderr, /answered HTTP 404/);
      const node = await ironic.node('node-b');
      assert.equal(node.provision_state, 'available');
      assert.ok(await noDeployment(uuid));
      // `node validate` says the same, per interface.
      const v = (JSON.parse(await ironic.baremetal('node', 'validate', 'node-b', '-f', 'json')) as { Interface: string; Result: boolean; Reason: string }[]).find((r) => r.Interface === 'deploy')!;
      assert.equal(v.Result, false);
      assert.match(v.Reason, /404/);
    } finally {
      await missing.stop();
    }
  });

  it('(b) a failure the service meets while deploying ends in "deploy failed" with its message; fixed, the node deploys', async () => {
    const outside = path.join(dir, 'elsewhere', 'node-c.raw'); // not under the agent's allowed_targets
    const uuid = await fakeNode('node-c', { smartnic_agent_url: agent.url, smartnic_target: outside });
    await ironic.baremetal('node', 'set', 'node-c', ...imageInfoArgs(origin.url, image));
    await ironic.baremetal('node', 'deploy', 'node-c');
    const failed = await ironic.waitForProvisionState('node-c', 'deploy failed', 60_000);
    assert.match(failed.last_error!, /could not prepare the streaming disk of node/);
    assert.match(failed.last_error!, /DPU_ERR_TARGET_NOT_ALLOWED/);
    assert.match(failed.last_error!, /allowed_targets/);
    assert.equal((await api.getDeployment(uuid)).state, 'failed', 'kept for inspection');

    // The operator fixes driver_info and deploys again: the failed deployment is replaced.
    await ironic.baremetal('node', 'set', 'node-c', '--driver-info', `smartnic_target=${target('node-c')}`);
    await ironic.baremetal('node', 'deploy', 'node-c');
    await ironic.waitForProvisionState('node-c', 'active', 60_000);
    assert.notEqual((await api.getDeployment(uuid)).state, 'failed');
    await ironic.baremetal('node', 'undeploy', 'node-c');
    await ironic.waitForProvisionState('node-c', 'available', 60_000);
    assert.ok(await noDeployment(uuid));
  });

  it('(c) a hung DPU agent: the deploy times out cleanly into "deploy failed" and the deployment is abandoned', async () => {
    const uuid = await fakeNode('node-d', { smartnic_agent_url: hung.url, smartnic_target: target('node-d') });
    await ironic.baremetal('node', 'set', 'node-d', ...imageInfoArgs(origin.url, image));
    const t0 = Date.now();
    await ironic.baremetal('node', 'deploy', 'node-d');
    await ironic.waitForProvisionState('node-d', 'wait call-back', 20_000);
    const failed = await ironic.waitForProvisionState('node-d', 'deploy failed', (DEPLOY_TIMEOUT_S + 30) * 1000);
    const took = Date.now() - t0;
    console.log(`      timed out into deploy failed after ${took} ms`);
    assert.ok(took >= DEPLOY_TIMEOUT_S * 1000, `failed after ${took} ms, before the timeout`);
    assert.match(failed.last_error!, new RegExp(`Timed out after ${DEPLOY_TIMEOUT_S} s`));
    assert.match(failed.last_error!, /deployment state attaching/);
    assert.match(failed.last_error!, /smartnic_agent_url/);
    assert.equal(failed.power_state, 'power off');
    await until('abandoned deployment deleted', () => noDeployment(uuid), 30_000, 250);
    // The node is not stuck: undeploy returns it to available.
    await ironic.baremetal('node', 'undeploy', 'node-d');
    await ironic.waitForProvisionState('node-d', 'available', 60_000);
  });

  it('(c) undeploy during "wait call-back" tears the pending deployment down', async () => {
    const uuid = await fakeNode('node-e', { smartnic_agent_url: hung.url, smartnic_target: target('node-e') });
    await ironic.baremetal('node', 'set', 'node-e', ...imageInfoArgs(origin.url, image));
    await ironic.baremetal('node', 'deploy', 'node-e');
    await ironic.waitForProvisionState('node-e', 'wait call-back', 20_000);
    assert.equal((await api.getDeployment(uuid)).state, 'attaching');
    await ironic.baremetal('node', 'undeploy', 'node-e');
    const node = await ironic.waitForProvisionState('node-e', 'available', 60_000);
    assert.equal(node.last_error, null);
    assert.ok(await noDeployment(uuid));
  });

  describe('(e) push: the driver service heartbeats Ironic; the poll (every hour) is not what resumes', () => {
    // An hour: within a test only the push can move a node on, so reaching the state at all
    // proves the push, without timing it against the poll.
    const POLL_S = 3600;
    let pushIronic: IronicServer;

    before(async () => {
      const port = await freePort();
      pushIronic = await IronicServer.create({
        dir: path.join(dir, 'ironic-push'),
        pluginDir: path.join(dir, 'plugin'),
        conf: {
          api: { port },
          smartnic: { driver_url: driver.url, token: TOKEN, heartbeat_url: `http://127.0.0.1:${port}`, poll_interval: POLL_S, deploy_timeout: 120, teardown_timeout: 30 },
        },
      });
      await pushIronic.start();
    });
    after(async () => {
      await pushIronic?.stop();
    });

    async function pushNode(name: string, targetPath: string): Promise<string> {
      const created = JSON.parse(
        await pushIronic.baremetal('node', 'create', '--name', name, '--driver', 'fake-hardware', '--deploy-interface', 'smartnic-streaming', '--driver-info', `smartnic_agent_url=${agent.url}`, '--driver-info', `smartnic_target=${targetPath}`, '-f', 'json'),
      ) as IronicNode;
      await pushIronic.baremetal('node', 'manage', name);
      await pushIronic.waitForProvisionState(name, 'manageable');
      await pushIronic.baremetal('node', 'provide', name);
      await pushIronic.waitForProvisionState(name, 'available');
      await pushIronic.baremetal('node', 'set', name, ...imageInfoArgs(origin.url, image));
      return created.uuid;
    }

    it('fake-hardware deploy → active, resumed by the heartbeat; the token is never shown', async () => {
      const uuid = await pushNode('node-push', target('node-push'));
      const t0 = Date.now();
      await pushIronic.baremetal('node', 'deploy', 'node-push');
      const active = await pushIronic.waitForProvisionState('node-push', 'active', 30_000);
      const took = Date.now() - t0;
      console.log(`      push: deploy → active in ${took} ms (poll every ${POLL_S} s)`);
      assert.equal(active.power_state, 'power on');
      assert.ok(pushIronic.logLines(uuid).some((l) => /streaming disk of node \S+ is ready; resuming the deploy \(push\)/.test(l)), 'resumed by heartbeat()');
      // Ironic wiped the token at the end of the deploy; the driver never shows it.
      assert.equal(active.driver_internal_info['agent_secret_token'], undefined);
      const shown = JSON.stringify(await api.getDeployment(uuid));
      assert.doesNotMatch(shown, /agent_token|callback/);
      assert.doesNotMatch(driver.output, /agent_token/);
      assert.doesNotMatch(driver.output, /could not notify Ironic/);

      await pushIronic.baremetal('node', 'undeploy', 'node-push');
      await pushIronic.waitForProvisionState('node-push', 'available', 60_000);
      assert.ok(await noDeployment(uuid));
    });

    it('a failure is pushed too: "deploy failed" with the service\'s message', async () => {
      const uuid = await pushNode('node-push-fail', path.join(dir, 'elsewhere', 'node-push-fail.raw'));
      const t0 = Date.now();
      await pushIronic.baremetal('node', 'deploy', 'node-push-fail');
      const failed = await pushIronic.waitForProvisionState('node-push-fail', 'deploy failed', 30_000);
      const took = Date.now() - t0;
      console.log(`      push: deploy → deploy failed in ${took} ms (poll every ${POLL_S} s)`);
      assert.match(failed.last_error!, /DPU_ERR_TARGET_NOT_ALLOWED/);
      await pushIronic.baremetal('node', 'undeploy', 'node-push-fail');
      await pushIronic.waitForProvisionState('node-push-fail', 'available', 60_000);
      assert.ok(await noDeployment(uuid));
    });
  });

  describe('(d) IPMI: ipmi_sim powers a QEMU host that boots from the streaming disk', () => {
    let bootOrigin: TestOrigin;
    let bmc: VirtualBmc;
    let uuid = '';
    let smallMs = 0;

    before(async () => {
      const bootImage = path.join(dir, 'boot.raw');
      await buildBootImage(bootImage, { sizeMiB: 64 });
      bootOrigin = new TestOrigin({ file: bootImage });
      await bootOrigin.start();
      bmc = new VirtualBmc({ dir: path.join(dir, 'bmc'), agentUrl: agent.url, agentToken: TOKEN, target: target('node-ipmi') });
      await bmc.start();
    });
    after(async () => {
      await bmc?.stop();
      await bootOrigin?.stop();
    });

    it('deploy → active, the host reaches its boot marker; undeploy powers it off and wipes the disk', async () => {
      uuid = await availableNode('node-ipmi', ['--driver', 'smartnic-ipmi'], {
        ...bmc.driverInfo(),
        smartnic_agent_url: agent.url,
        smartnic_target: target('node-ipmi'),
        // Slow the background copy so that it visibly runs while the host boots.
        smartnic_bandwidth: 4 * MiB,
      });
      // The origin holds back a range the guest never reads until the boot marker: ACTIVE
      // and the boot provably come before the copy ends, however fast or slow the machine.
      const held = unreadRange(64);
      bootOrigin.hold(held.from, held.to);
      const enrolled = await ironic.node('node-ipmi');
      assert.equal(enrolled.deploy_interface, 'smartnic-streaming', 'the default deploy interface of smartnic-ipmi');
      assert.equal(enrolled.power_state, 'power off');
      await ironic.baremetal('node', 'set', 'node-ipmi', ...imageInfoArgs(bootOrigin.url, path.join(dir, 'boot.raw')));

      const t0 = Date.now();
      await ironic.baremetal('node', 'deploy', 'node-ipmi');
      const active = await ironic.waitForProvisionState('node-ipmi', 'active', 90_000);
      smallMs = Date.now() - t0;
      console.log(`      IPMI: deploy → active in ${smallMs} ms (64 MiB image)`);
      assert.equal(active.power_state, 'power on');
      assert.ok(bmc.qemuPid() !== null, 'QEMU runs');
      assert.match(bmc.chassisLog(), /set boot default/, 'boot device set to disk through IPMI');
      const atActive = active.driver_internal_info['smartnic_progress'] as { fraction: number };
      assert.ok(atActive.fraction < 1, `ACTIVE before hydration finished (fraction ${atActive.fraction})`);

      await until('boot marker on the serial console', async () => bmc.serial().includes(BOOT_MARKER), 120_000, 250);
      console.log(`      IPMI: boot marker ${Date.now() - t0} ms after deploy`);
      assert.notEqual((await agentApi.listDisks()).find((d) => d.target.path === target('node-ipmi'))?.state, 'complete', 'booted before the copy ended');
      bootOrigin.release();
      // The guest saw the streaming disk as its NVMe drive, with the image's size.
      const size = await until('NVMe size line', async () => /SMARTNIC-NVME-SIZE sectors=\d+ bytes=(\d+)/.exec(bmc.serial()), 30_000, 250);
      assert.equal(Number(size[1]), fs.statSync(path.join(dir, 'boot.raw')).size);

      await ironic.baremetal('node', 'undeploy', 'node-ipmi');
      const available = await ironic.waitForProvisionState('node-ipmi', 'available', 90_000);
      assert.equal(available.power_state, 'power off');
      assert.equal(bmc.qemuPid(), null, 'QEMU was powered off');
      assert.ok(await noDeployment(uuid));
      assert.equal((await agentApi.listDisks()).length, 0);
      assert.equal(fs.existsSync(target('node-ipmi')), false, 'the target was wiped');
    });

    it('deploy → active does not grow with the image: an 8× larger image is ACTIVE and boots with most of it not copied', async () => {
      assert.ok(smallMs > 0, 'the 64 MiB deploy ran');
      const big = path.join(dir, 'boot-big.raw');
      await buildBootImage(big, { sizeMiB: 512 });
      const bigOrigin = new TestOrigin({ file: big });
      await bigOrigin.start();
      // All but the first 34 MiB and the last 10 MiB held back until the marker: if ACTIVE or
      // the boot waited for the copy (as a copy-first deploy's would, 8× longer), it would never come.
      const held = unreadRange(512);
      bigOrigin.hold(held.from, held.to);
      try {
        fs.rmSync(bmc.serialLog, { force: true });
        await ironic.baremetal('node', 'set', 'node-ipmi', ...imageInfoArgs(bigOrigin.url, big));
        const t0 = Date.now();
        await ironic.baremetal('node', 'deploy', 'node-ipmi');
        const active = await ironic.waitForProvisionState('node-ipmi', 'active', 90_000);
        const bigMs = Date.now() - t0;
        console.log(`      IPMI: deploy → active in ${bigMs} ms (512 MiB image; 64 MiB took ${smallMs} ms)`);
        const p = active.driver_internal_info['smartnic_progress'] as { fraction: number; regions_total: number };
        assert.equal(p.regions_total, 512, '512 regions of 1 MiB');
        assert.ok(p.fraction < 0.5, `ACTIVE long before the copy ends (fraction ${p.fraction})`);
        await until('boot marker from the 512 MiB image', async () => bmc.serial().includes(BOOT_MARKER), 120_000, 250);
        const disk = (await agentApi.listDisks()).find((d) => d.target.path === target('node-ipmi'))!;
        assert.ok(disk.regions.local <= disk.regions.total - (held.to - held.from) / MiB, `booted with ${disk.regions.local} of ${disk.regions.total} regions local`);
        bigOrigin.release();
        await ironic.baremetal('node', 'undeploy', 'node-ipmi');
        await ironic.waitForProvisionState('node-ipmi', 'available', 90_000);
        assert.equal(bmc.qemuPid(), null);
        assert.ok(await noDeployment(uuid));
      } finally {
        await bigOrigin.stop();
      }
    });
  });
});

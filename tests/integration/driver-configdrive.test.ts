/**
 * The driver service with a config drive and a root disk size, as Ironic and Nova pass
 * them in instance_info, against real processes (redis-server, the DPU agent daemon, the
 * driver service, an HTTP origin serving a GPT image made by sgdisk): the drive reaches
 * the disk before it is ready, in both forms Ironic hands over (inline gzip+base64, a URL),
 * on a disk of root_gb; what cannot work is refused naming the field.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import path from 'node:path';
import { gzipSync } from 'node:zlib';
import { AgentClient } from '../../openapi/clients/agent-client.js';
import { DriverClient, type Deployment, type DeploymentCreate } from '../../openapi/clients/driver-client.js';
import { ApiError } from '../../openapi/clients/http.js';
import { tempDir } from '../helpers/agent.js';
import { TestOrigin } from '../helpers/origin.js';
import { RedisServer } from '../helpers/redis.js';
import { run } from '../helpers/run.js';
import { agentDaemon, driverService, type ServiceProcess, TOKEN, until } from '../helpers/services.js';

const MiB = 1 << 20;
const GiB = 1 << 30;

describe('driver service: config drive and root disk size', function () {
  this.timeout(180_000);
  let tmp: { dir: string; cleanup: () => void };
  let image: string;
  let origin: TestOrigin;
  let redis: RedisServer;
  let agent: ServiceProcess;
  let driver: ServiceProcess;
  let api: DriverClient;
  let agentApi: AgentClient;
  let iso: Buffer;
  let encoded: string;
  let drives: http.Server;
  let drivesUrl: string;

  before(async () => {
    tmp = tempDir('driver-cd');
    image = path.join(tmp.dir, 'image.raw');
    fs.writeFileSync(image, Buffer.alloc(0));
    fs.truncateSync(image, 24 * MiB);
    await run('sgdisk', ['-o', '-n', '1:2048:+4M', '-t', '1:ef00', '-n', '2:0:0', image]);
    origin = new TestOrigin({ file: image });
    await origin.start();
    const root = path.join(tmp.dir, 'cd', 'openstack', 'latest');
    fs.mkdirSync(root, { recursive: true });
    fs.writeFileSync(path.join(root, 'meta_data.json'), '{"uuid": "node-cd"}');
    fs.writeFileSync(path.join(root, 'user_data'), '#cloud-config\nruncmd: [echo SMARTNIC-USER-DATA]\n');
    await run('genisoimage', ['-o', path.join(tmp.dir, 'cd.iso'), '-quiet', '-J', '-r', '-V', 'config-2', path.join(tmp.dir, 'cd')]);
    iso = fs.readFileSync(path.join(tmp.dir, 'cd.iso'));
    encoded = gzipSync(iso).toString('base64');
    // Where Ironic's configdrive_use_object_store would put it: a URL of the encoded drive.
    drives = http.createServer((req, res) => {
      if (req.url === '/configdrive-node') res.end(encoded);
      else res.writeHead(404).end('no such object');
    });
    await new Promise<void>((r) => drives.listen(0, '127.0.0.1', r));
    drivesUrl = `http://127.0.0.1:${(drives.address() as AddressInfo).port}`;
    redis = new RedisServer(path.join(tmp.dir, 'redis'));
    await redis.start();
    agent = await agentDaemon({ dir: path.join(tmp.dir, 'agent') });
    await agent.start();
    agentApi = new AgentClient({ baseUrl: agent.url, token: TOKEN });
    driver = await driverService({ dir: tmp.dir, redisUrl: redis.url });
    await driver.start();
    api = new DriverClient({ baseUrl: driver.url, token: TOKEN });
  });
  after(async () => {
    await driver?.stop();
    await agent?.stop();
    await redis?.stop();
    await origin?.stop();
    drives?.close();
    tmp.cleanup();
  });

  const target = (node: string): string => path.join(tmp.dir, 'agent', 'targets', `${node}.raw`);
  const request = (node: string, ii: Partial<DeploymentCreate['instance_info']>): DeploymentCreate => ({
    node_uuid: node,
    instance_info: { image_source: origin.url, ...ii },
    driver_info: { smartnic_agent_url: agent.url, smartnic_target: target(node) },
  });
  const settled = (node: string): Promise<Deployment> =>
    until(`${node} ready or failed`, async () => {
      const d = await api.getDeployment(node);
      return ['ready', 'complete', 'failed'].includes(d.state) ? d : null;
    }, 60_000);

  async function deployAndCheck(node: string, configdrive: string): Promise<void> {
    await api.createDeployment(request(node, { root_gb: 1, configdrive }));
    const d = await settled(node);
    assert.notEqual(d.state, 'failed', d.last_error ?? '');
    const disk = (await agentApi.listDisks()).find((x) => x.target.path === target(node))!;
    assert.equal(disk.size, GiB, 'the disk is the root disk, not the image');
    assert.equal(disk.image_size, 24 * MiB);
    assert.deepEqual(disk.device, d.device, 'the agent presents the identity the driver reports');
    const cd = disk.config_drive!;
    assert.ok(cd, 'the config drive was written before the disk was ready');
    assert.equal(cd.partition, 3);
    assert.ok(cd.offset + cd.length <= GiB && cd.offset >= GiB - 66 * MiB);
    // What the host will see: sgdisk finds a sound table, blkid the config-2 filesystem.
    const view = path.join(tmp.dir, `${node}.head`);
    await run('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', d.export_uri!, view]);
    assert.match((await run('sgdisk', ['-v', view])).stdout, /No problems found/);
    assert.equal((await run('blkid', ['-p', '-O', String(cd.offset), '-o', 'value', '-s', 'LABEL', view])).stdout.trim(), 'config-2');
    assert.ok(fs.readFileSync(view).subarray(cd.offset, cd.offset + iso.length).equals(iso));
    fs.rmSync(view);
    await api.deleteDeployment(node);
    await until(`${node} deleted`, async () => api.getDeployment(node).then(() => false, (e: unknown) => e instanceof ApiError && e.status === 404));
  }

  it('an inline config drive (gzip+base64, as Ironic stores it) is on a root_gb disk before it is ready', async () => {
    await deployAndCheck('node-inline', encoded);
  });

  it('a config drive URL (Ironic\'s object store) is downloaded and written the same way', async () => {
    await deployAndCheck('node-url', `${drivesUrl}/configdrive-node`);
  });

  it('refuses what cannot work, naming instance_info.configdrive or root_gb', async () => {
    const refused = async (p: Promise<unknown>, code: string, field: string, pattern: RegExp): Promise<void> => {
      await assert.rejects(p, (e: unknown) => e instanceof ApiError && e.code === code && e.field === field && pattern.test(e.message));
    };
    await refused(api.createDeployment(request('node-bad', { configdrive: 'not base64 at all!' })), 'DRV_ERR_CONFIG_DRIVE', 'instance_info.configdrive', /neither base64/);
    await refused(api.createDeployment(request('node-bad', { configdrive: gzipSync(Buffer.from('hello')).toString('base64') })), 'DRV_ERR_CONFIG_DRIVE', 'instance_info.configdrive', /neither an ISO 9660 nor a FAT/);
    await refused(api.validate(request('node-bad', { configdrive: Buffer.from('x').toString('base64') })), 'DRV_ERR_CONFIG_DRIVE', 'instance_info.configdrive', /ISO 9660/);
    // A URL that answers 404: the attach job fails the deployment, saying why.
    await api.createDeployment(request('node-404', { configdrive: `${drivesUrl}/missing` }));
    const d = await settled('node-404');
    assert.equal(d.state, 'failed');
    assert.match(d.last_error ?? '', /DRV_ERR_CONFIG_DRIVE.*HTTP 404/);
    await api.deleteDeployment('node-404');
    // root_gb smaller than the image (a sparse 1 GiB + 1 MiB image: only probed).
    const big = path.join(tmp.dir, 'big.raw');
    fs.writeFileSync(big, Buffer.alloc(0));
    fs.truncateSync(big, GiB + MiB);
    const bigOrigin = new TestOrigin({ file: big });
    await bigOrigin.start();
    try {
      await refused(api.validate({ ...request('node-big', { root_gb: 1 }), instance_info: { image_source: bigOrigin.url, root_gb: 1 } }), 'DRV_ERR_INVALID', 'instance_info.root_gb', /1 GiB, but the image is 1\.00 GiB/);
    } finally {
      await bigOrigin.stop();
    }
  });
});

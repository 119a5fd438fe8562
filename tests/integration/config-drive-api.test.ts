/**
 * The agent's root disk size and config drive through its management API, in-process over
 * a real socket (responses checked strictly against openapi/dpu-agent.yaml), with a real
 * origin serving a GPT image made by sgdisk, an ISO made by genisoimage as Ironic makes
 * it, and the host's view read through a real NBD client (nbdcopy) and checked by sgdisk
 * and blkid: what the host's firmware and cloud-init will see.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { pino } from 'pino';
import type { FastifyInstance } from 'fastify';
import { AgentClient } from '../../openapi/clients/agent-client.js';
import { ApiError } from '../../openapi/clients/http.js';
import { buildAgentApi } from '../../dpu-agent/src/daemon/api.js';
import { parseAgentConfig } from '../../dpu-agent/src/daemon/config.js';
import { DiskManager } from '../../dpu-agent/src/daemon/disks.js';
import { tempDir } from '../helpers/agent.js';
import { TestOrigin } from '../helpers/origin.js';
import { run } from '../helpers/run.js';

const MiB = 1 << 20;
const REGION = 256 << 10;
const IMAGE = 24 * MiB;
const DISK = 128 * MiB;
const TOKEN = 'test-token-0123456789abcdef';

async function apiError(p: Promise<unknown>): Promise<ApiError> {
  try {
    await p;
  } catch (err) {
    assert.ok(err instanceof ApiError, String(err));
    return err;
  }
  throw new Error('expected an API error');
}

describe('agent API: root disk size and config drive', function () {
  this.timeout(120_000);
  let tmp: { dir: string; cleanup: () => void };
  let origin: TestOrigin;
  let manager: DiskManager;
  let app: FastifyInstance;
  let client: AgentClient;
  let iso: Buffer;
  let config: ReturnType<typeof parseAgentConfig>;
  const log = pino({ level: 'silent' });

  async function startAgent(): Promise<void> {
    manager = new DiskManager({ config, log });
    await manager.start();
    app = buildAgentApi({ config, manager, log, responseValidation: 'strict' });
    client = new AgentClient({ baseUrl: await app.listen({ port: 0, host: '127.0.0.1' }), token: TOKEN });
  }
  async function stopAgent(): Promise<void> {
    await app.close();
    await manager.close();
  }

  /** The disk as the host sees it, through NBD. */
  async function hostView(socket: string, name: string): Promise<string> {
    const out = path.join(tmp.dir, name);
    fs.rmSync(out, { force: true });
    await run('nbdcopy', [`nbd+unix:///disk?socket=${socket}`, out]);
    return out;
  }

  before(async () => {
    tmp = tempDir('cfgdrive-api');
    const image = path.join(tmp.dir, 'image.raw');
    fs.writeFileSync(image, Buffer.alloc(0));
    fs.truncateSync(image, IMAGE);
    await run('sgdisk', ['-o', '-n', '1:2048:+4M', '-t', '1:ef00', '-n', '2:0:0', image]);
    // Some image content where the host would find its root filesystem.
    const fd = fs.openSync(image, 'r+');
    fs.writeSync(fd, Buffer.alloc(4 * MiB, 0x3c), 0, 4 * MiB, 8 * MiB);
    fs.closeSync(fd);
    origin = new TestOrigin({ file: image });
    await origin.start();
    const root = path.join(tmp.dir, 'cd', 'openstack', 'latest');
    fs.mkdirSync(root, { recursive: true });
    fs.writeFileSync(path.join(root, 'meta_data.json'), '{"uuid": "node-1"}');
    await run('genisoimage', ['-o', path.join(tmp.dir, 'cd.iso'), '-quiet', '-J', '-r', '-V', 'config-2', path.join(tmp.dir, 'cd')]);
    iso = fs.readFileSync(path.join(tmp.dir, 'cd.iso'));
    config = parseAgentConfig(
      {
        auth: { tokens: [TOKEN] },
        state_dir: path.join(tmp.dir, 'state'),
        export_dir: path.join(tmp.dir, 'run'),
        allowed_targets: [path.join(tmp.dir, 'targets') + '/'],
        defaults: { commit_interval_ms: 200, hydration_paused: true },
      },
      'test config',
    );
    await startAgent();
  });
  after(async () => {
    await stopAgent().catch(() => undefined);
    await origin.stop();
    tmp.cleanup();
  });

  const create = (id: string, size?: number) =>
    client.createDisk({ id, source: { url: origin.url }, target: { path: path.join(tmp.dir, 'targets', `${id}.raw`) }, region_size: REGION, ...(size !== undefined ? { size } : {}) });

  it('a disk the size of the root disk: image_size and size reported, zeros after the image never fetched', async () => {
    const d = await create('root', DISK);
    assert.equal(d.size, DISK);
    assert.equal(d.image_size, IMAGE);
    assert.equal(d.config_drive, null);
    assert.equal(d.regions.total, DISK / REGION);
    assert.equal(d.regions.zero, (DISK - IMAGE) / REGION);
    const e = await apiError(create('small', IMAGE - REGION));
    assert.equal(e.status, 400);
    assert.equal(e.code, 'DPU_ERR_DISK_TOO_SMALL');
    assert.equal(e.field, 'size');
  });

  it('writes the config drive as IPA would: sgdisk verifies the host\'s view, blkid finds config-2; only table regions fetched', async () => {
    const before = (await client.getDisk('root')).bytes_fetched;
    const d = await client.setConfigDrive('root', iso);
    const cd = d.config_drive!;
    assert.equal(cd.table, 'gpt');
    assert.equal(cd.partition, 3);
    assert.equal(cd.bytes, iso.length);
    assert.ok(cd.offset >= IMAGE && cd.offset + cd.length <= DISK);
    // The tables' region and the two partitions' first regions (their labels are looked at): nothing else.
    assert.ok(d.bytes_fetched - before <= 3 * REGION, `fetched ${d.bytes_fetched - before} bytes`);
    const view = await hostView(d.export.socket!, 'host.raw');
    const v = await run('sgdisk', ['-v', view]);
    assert.match(v.stdout, /No problems found/, v.stdout);
    const label = await run('blkid', ['-p', '-O', String(cd.offset), '-o', 'value', '-s', 'LABEL', view]);
    assert.equal(label.stdout.trim(), 'config-2');
    const bytes = fs.readFileSync(view);
    assert.ok(bytes.subarray(cd.offset, cd.offset + iso.length).equals(iso));
    // The image's own bytes elsewhere are unchanged.
    const img = fs.readFileSync(path.join(tmp.dir, 'image.raw'));
    assert.ok(bytes.subarray(REGION, IMAGE - REGION).equals(img.subarray(REGION, IMAGE - REGION)));
  });

  it('the same drive again is answered from the record; a bad one is refused and changes nothing', async () => {
    const first = (await client.getDisk('root')).config_drive!;
    const again = await client.setConfigDrive('root', iso);
    assert.deepEqual(again.config_drive, first);
    const e = await apiError(client.setConfigDrive('root', Buffer.from('not an iso at all')));
    assert.equal(e.status, 400);
    assert.equal(e.code, 'DPU_ERR_CONFIG_DRIVE');
    assert.match(e.message, /neither an ISO 9660 nor a FAT/);
    assert.deepEqual((await client.getDisk('root')).config_drive, first);
  });

  it('a restarted agent still reports the config drive, and the disk completes with it', async () => {
    const first = (await client.getDisk('root')).config_drive!;
    await stopAgent();
    await startAgent();
    const d = await client.getDisk('root');
    assert.deepEqual(d.config_drive, first);
    await client.updateHydration('root', { paused: false });
    for (let i = 0; i < 600 && (await client.getDisk('root')).state !== 'complete'; i++) await new Promise((r) => setTimeout(r, 100));
    const done = await client.getDisk('root');
    assert.equal(done.state, 'complete');
    assert.ok(done.bytes_fetched <= IMAGE + 3 * REGION, `fetched ${done.bytes_fetched} of a ${IMAGE}-byte image`);
    const target = fs.readFileSync(path.join(tmp.dir, 'targets', 'root.raw'));
    assert.ok(target.subarray(first.offset, first.offset + iso.length).equals(iso));
  });

  it('the NVMe identity: derived from the id and stable, or as given; another one for the same disk is refused', async () => {
    const derived = (await client.getDisk('root')).device;
    assert.match(derived.serial, /^[0-9a-f]{20}$/);
    assert.match(derived.wwn, /^eui\.[0-9a-f]{16}$/);
    assert.equal(derived.model, 'SmartNIC Streaming Disk');
    const device = { serial: 'SN-NODE-7', model: 'DPU Boot Disk', wwn: 'eui.02aabbccddeeff00' };
    const given = await client.createDisk({ id: 'named', source: { url: origin.url }, target: { path: path.join(tmp.dir, 'targets', 'named.raw') }, region_size: REGION, device });
    assert.deepEqual(given.device, device);
    const again = await client.createDisk({ id: 'named', source: { url: origin.url }, target: { path: path.join(tmp.dir, 'targets', 'named.raw') }, region_size: REGION, device });
    assert.deepEqual(again.device, device);
    const e = await apiError(client.createDisk({ id: 'named', source: { url: origin.url }, target: { path: path.join(tmp.dir, 'targets', 'named.raw') }, region_size: REGION, device: { ...device, serial: 'OTHER' } }));
    assert.equal(e.status, 409);
    assert.equal(e.field, 'device.serial');
    const bad = await apiError(client.createDisk({ id: 'badwwn', source: { url: origin.url }, target: { path: path.join(tmp.dir, 'targets', 'badwwn.raw') }, device: { wwn: '0x1234' } }));
    assert.equal(bad.status, 400);
    assert.match(bad.message, /wwn/);
  });

  it('an image with no room at the disk\'s end is refused, naming the root disk size', async () => {
    await create('tight');
    const e = await apiError(client.setConfigDrive('tight', iso));
    assert.equal(e.status, 400);
    assert.equal(e.code, 'DPU_ERR_CONFIG_DRIVE');
    assert.match(e.message, /root_gb/);
    assert.equal((await client.getDisk('tight')).config_drive, null);
  });
});

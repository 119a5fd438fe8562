/**
 * qcow2 images streamed as the raw disks they describe, through real peers: qemu-img
 * makes the images (versions 2 and 3, plain and compressed), TestOrigin serves the .qcow2
 * file over HTTP, `dpu-agent stream --format qcow2` exports the virtual disk, qemu-img
 * compares it over NBD while hydration is still running, and the target ends equal to the
 * raw image having fetched no more than the qcow2 file holds. Then a QEMU host boots a
 * compressed qcow2 before its hydration ends (the origin holds back part of the image
 * until the marker, so that is so whatever the machine's speed), and the management API creates a qcow2 disk
 * and refuses one with a backing file.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { Writable } from 'node:stream';
import type { FastifyInstance } from 'fastify';
import { pino } from 'pino';
import { AgentClient, type Disk } from '../../openapi/clients/agent-client.js';
import { ApiError } from '../../openapi/clients/http.js';
import { buildAgentApi } from '../../dpu-agent/src/daemon/api.js';
import { parseAgentConfig } from '../../dpu-agent/src/daemon/config.js';
import { DiskManager } from '../../dpu-agent/src/daemon/disks.js';
import { AgentProcess, nbdUri, tempDir } from '../helpers/agent.js';
import { bootFromNbd, buildBootImage, unreadRange } from '../helpers/boot-image.js';
import { TestOrigin } from '../helpers/origin.js';
import { type ConvertOptions, makeMixedImage, toQcow2 } from '../helpers/qcow2-images.js';
import { run } from '../helpers/run.js';

const MiB = 1 << 20;
const RAW_SIZE = 24 * MiB;
const TOKEN = 'test-token-0123456789abcdef';

/**
 * Where the qcow2 file `image` stores virtual bytes [from, to): they must lie in one
 * uncompressed extent (qemu-img convert -c stores incompressible clusters, as a boot
 * image's random partition, plainly and in order).
 */
async function fileRangeOf(image: string, from: number, to: number): Promise<{ from: number; to: number }> {
  const map = JSON.parse((await run('qemu-img', ['map', '--output=json', image])).stdout) as { start: number; length: number; offset?: number }[];
  const e = map.find((x) => x.offset !== undefined && x.start <= from && to <= x.start + x.length);
  if (!e) throw new Error(`${image} does not store virtual bytes ${from}..${to} in one plain extent: ${JSON.stringify(map)}`);
  return { from: e.offset! + (from - e.start), to: e.offset! + (to - e.start) };
}

const VARIANTS: { name: string; opts: ConvertOptions; format: 'qcow2' | 'auto' }[] = [
  { name: 'v3', opts: {}, format: 'qcow2' },
  { name: 'v3 compressed', opts: { compressed: true }, format: 'qcow2' },
  { name: 'v2', opts: { compat: '0.10' }, format: 'qcow2' },
  { name: 'v2 compressed (format auto)', opts: { compat: '0.10', compressed: true }, format: 'auto' },
];

describe('qcow2 images through the agent', function () {
  this.timeout(120_000);
  let dir: string;
  let cleanup: () => void;
  let rawFile: string;
  let raw: Buffer;
  let origin: TestOrigin | null = null;
  let agent: AgentProcess | null = null;

  before(async () => {
    ({ dir, cleanup } = tempDir('qcow2'));
    rawFile = path.join(dir, 'disk.raw');
    makeMixedImage(rawFile, RAW_SIZE, 3);
    raw = fs.readFileSync(rawFile);
  });
  afterEach(async () => {
    await agent?.kill();
    agent = null;
    await origin?.stop();
    origin = null;
  });
  after(() => cleanup());

  VARIANTS.forEach((v, i) => {
    it(`streams a ${v.name} image: identical over NBD during hydration, the target equals the raw image after`, async () => {
      const image = path.join(dir, `v${i}.qcow2`);
      await toQcow2(rawFile, image, v.opts);
      const imageSize = fs.statSync(image).size;
      origin = new TestOrigin({ file: image });
      await origin.start();
      const sock = path.join(dir, `v${i}.sock`);
      const target = path.join(dir, `v${i}.target`);
      // Hydration is capped so that it is still running when qemu-img compares.
      agent = new AgentProcess({ source: origin.url, target, state: path.join(dir, `state${i}`), socket: sock, extra: ['--format', v.format, '--bandwidth', '2M'] });
      const listening = await agent.listening();
      assert.equal(listening['size'], RAW_SIZE, 'the export has the virtual size');
      assert.equal(agent.events.some((e) => e.event === 'complete'), false);
      await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', rawFile, nbdUri(sock)]);
      await agent.complete(60_000);
      assert.equal(fs.statSync(target).size, RAW_SIZE);
      assert.ok(fs.readFileSync(target).equals(raw), 'the target equals the raw image');
      const sent = origin.stats.bytesSent;
      console.log(`      fetched ${sent} bytes of a ${imageSize}-byte qcow2 (${((sent / imageSize) * 100).toFixed(1)} %) in ${origin.stats.rangeRequests} range requests`);
      assert.ok(sent <= imageSize, `origin sent ${sent} bytes for a ${imageSize}-byte qcow2`);
      assert.equal(await agent.stop(), 0);
      const record = JSON.parse(fs.readFileSync(path.join(dir, `state${i}`, 'disk.json'), 'utf8')) as { format: string; identity: string; size: number };
      assert.equal(record.format, 'qcow2');
      assert.equal(record.size, RAW_SIZE);
      assert.match(record.identity, /;qcow2$/);
    });
  });

  it('refuses a qcow2 with a backing file at start-up, naming the feature', async () => {
    const overlay = path.join(dir, 'overlay.qcow2');
    await run('qemu-img', ['create', '-f', 'qcow2', '-b', rawFile, '-F', 'raw', overlay]);
    origin = new TestOrigin({ file: overlay });
    await origin.start();
    agent = new AgentProcess({ source: origin.url, target: path.join(dir, 'overlay.target'), state: path.join(dir, 'overlay-state'), socket: path.join(dir, 'overlay.sock'), extra: ['--format', 'qcow2'] });
    assert.equal(await agent.exitCode(), 1);
    assert.match(agent.stderr, /DPU_ERR_IMAGE_UNSUPPORTED.*backing file/);
    assert.equal(fs.existsSync(path.join(dir, 'overlay.target')), false, 'no target was made');
  });

  it('boots a host from a compressed qcow2 before its hydration ends; the target ends as the raw disk', async function () {
    this.timeout(240_000);
    const bootRaw = path.join(dir, 'boot.raw');
    const bootQcow2 = path.join(dir, 'boot.qcow2');
    await buildBootImage(bootRaw, { sizeMiB: 64 });
    await toQcow2(bootRaw, bootQcow2, { compressed: true });
    const image = fs.readFileSync(bootRaw);
    const qcow2Size = fs.statSync(bootQcow2).size;
    origin = new TestOrigin({ file: bootQcow2 });
    await origin.start();
    const sock = path.join(dir, 'boot.sock');
    const target = path.join(dir, 'boot.target');
    // Hydration runs during the boot (capped, so that it visibly does) but cannot finish
    // before the marker: the origin holds back the file bytes of a range the guest never reads.
    const unread = unreadRange(64);
    const held = await fileRangeOf(bootQcow2, unread.from, unread.to);
    origin.hold(held.from, held.to);
    agent = new AgentProcess({ source: origin.url, target, state: path.join(dir, 'boot-state'), socket: sock, extra: ['--format', 'qcow2', '--bandwidth', '4M'] });
    await agent.listening();
    let atMarker: { regionsLocal: number; regionsTotal: number; complete: boolean } | null = null;
    const serial: string[] = [];
    const result = await bootFromNbd(nbdUri(sock), {
      timeoutMs: 120_000,
      log: (line) => serial.push(line),
      onMarker: () => {
        const p = agent!.latestProgress()!;
        atMarker = { regionsLocal: p['regionsLocal'] as number, regionsTotal: p['regionsTotal'] as number, complete: agent!.events.some((e) => e.event === 'complete') };
      },
    });
    console.log(`      boot marker ${Math.round(result.markerSeenMs)} ms after QEMU started (compressed qcow2, ${qcow2Size} bytes for ${image.length})`);
    assert.ok(atMarker, 'marker seen');
    const m = atMarker as { regionsLocal: number; regionsTotal: number; complete: boolean };
    assert.equal(m.complete, false, 'hydration still running at the marker');
    assert.ok(m.regionsLocal <= m.regionsTotal - (unread.to - unread.from) / MiB, `at the marker ${m.regionsLocal}/${m.regionsTotal} regions were local, none of the held ones`);
    const tail = serial.join('\n').match(/SMARTNIC-NVME-TAIL-SHA256 ([0-9a-f]{64})/);
    assert.ok(tail, `guest printed its tail hash:\n${serial.slice(-10).join('\n')}`);
    assert.equal(tail[1], createHash('sha256').update(image.subarray(image.length - 4096)).digest('hex'));

    origin.release();
    await agent.complete(120_000);
    assert.ok(fs.readFileSync(target).equals(image), 'the target equals the raw boot disk');
    assert.ok(origin.stats.bytesSent <= qcow2Size, `origin sent ${origin.stats.bytesSent} bytes for a ${qcow2Size}-byte qcow2`);
    assert.equal(await agent.stop(), 0);
  });

  describe('through the management API', () => {
    let manager: DiskManager;
    let app: FastifyInstance;
    let client: AgentClient;
    let targets: string;

    before(async () => {
      targets = path.join(dir, 'api-targets') + '/';
      const config = parseAgentConfig(
        { auth: { tokens: [TOKEN] }, state_dir: path.join(dir, 'api-state'), export_dir: path.join(dir, 'api-run'), allowed_targets: [targets], defaults: { open_timeout_ms: 2000 }, log_level: 'warn' },
        'test config',
      );
      const log = pino({ level: 'warn' }, new Writable({ write: (_c, _e, cb) => cb() }));
      manager = new DiskManager({ config, log });
      await manager.start();
      app = buildAgentApi({ config, manager, log, responseValidation: 'strict' });
      client = new AgentClient({ baseUrl: await app.listen({ port: 0, host: '127.0.0.1' }), token: TOKEN });
    });
    after(async () => {
      await app?.close();
      await manager?.close();
    });

    it('creates a disk from source.format qcow2 (virtual size) and refuses a backing file with 400', async () => {
      const image = path.join(dir, 'api.qcow2');
      await toQcow2(rawFile, image, { compressed: true });
      origin = new TestOrigin({ file: image });
      await origin.start();
      const d: Disk = await client.createDisk({ id: 'q', source: { url: origin.url, format: 'qcow2' }, target: { path: path.join(targets, 'q.raw') } });
      assert.equal(d.size, RAW_SIZE);
      assert.equal(d.source.format, 'qcow2');
      await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', rawFile, d.export.uri]);
      // Another format for the same id is another disk.
      await assert.rejects(client.createDisk({ id: 'q', source: { url: origin.url }, target: { path: path.join(targets, 'q.raw') } }), (err: ApiError) => err.code === 'DPU_ERR_DISK_EXISTS');
      await client.deleteDisk('q', true);

      const overlay = path.join(dir, 'api-overlay.qcow2');
      await run('qemu-img', ['create', '-f', 'qcow2', '-b', rawFile, '-F', 'raw', overlay]);
      await origin.stop();
      origin = new TestOrigin({ file: overlay });
      await origin.start();
      await assert.rejects(client.createDisk({ id: 'o', source: { url: origin.url, format: 'auto' }, target: { path: path.join(targets, 'o.raw') } }), (err: ApiError) => {
        assert.equal(err.status, 400);
        assert.equal(err.code, 'DPU_ERR_IMAGE_UNSUPPORTED');
        assert.match(err.message, /backing file/);
        return true;
      });
      assert.equal((await client.listDisks()).length, 0);
    });
  });
});

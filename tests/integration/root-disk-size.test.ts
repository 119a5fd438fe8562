/**
 * A streaming disk the size of the node's root disk, larger than its image (Ironic's
 * root_gb): the image at the start, zeros after it, never fetched. The image here ends in
 * the middle of a region, so one region straddles its end. Real HTTP origin, real target
 * and region map; the manifest is the image's, applied to the larger disk.
 */
import assert from 'node:assert/strict';
import { once } from 'node:events';
import fs from 'node:fs';
import path from 'node:path';
import pino from 'pino';
import { DpuError } from '../../image-access/src/errors.js';
import { Manifest } from '../../image-access/src/manifest.js';
import { RegionState } from '../../dpu-agent/src/region/region-map.js';
import { HttpSource } from '../../image-access/src/http-source.js';
import { openStreamingDisk, type OpenedDisk } from '../../dpu-agent/src/streaming/open.js';
import { makeImage, tempDir } from '../helpers/agent.js';
import { TestOrigin } from '../helpers/origin.js';

const REGION = 64 << 10;
const IMAGE = 10 * REGION + 12_288; // ends inside region 10
const DISK = 32 * REGION;

describe('root disk larger than the image', function () {
  this.timeout(60_000);
  let tmp: { dir: string; cleanup: () => void };
  let origin: TestOrigin;
  let url: string;
  let model: Buffer;
  const open: OpenedDisk[] = [];
  const log = pino({ level: 'silent' });

  before(async () => {
    tmp = tempDir('rootsize');
    const file = path.join(tmp.dir, 'image.raw');
    makeImage(file, IMAGE, 5);
    model = fs.readFileSync(file);
    origin = new TestOrigin({ file });
    url = await origin.start();
  });
  after(async () => {
    for (const o of open) await o.close().catch(() => undefined);
    await origin.stop();
    tmp.cleanup();
  });

  async function openDisk(name: string, diskSize: number | undefined, manifest?: Manifest): Promise<OpenedDisk> {
    const o = await openStreamingDisk({
      source: { url },
      targetPath: path.join(tmp.dir, `${name}.target`),
      stateDir: path.join(tmp.dir, name),
      regionSize: REGION,
      ...(diskSize !== undefined ? { diskSize } : {}),
      ...(manifest ? { manifest } : {}),
      log,
    });
    open.push(o);
    return o;
  }

  it('serves the image then zeros; regions past the image are zero and never fetched', async () => {
    const o = await openDisk('plain', DISK);
    assert.equal(o.disk.size, DISK);
    const first = Math.ceil(IMAGE / REGION);
    for (let r = first; r < DISK / REGION; r++) assert.equal(o.disk.map.state(r), RegionState.Zero, `region ${r}`);
    const before = origin.stats.bytesSent;
    const tail = Buffer.alloc(DISK - first * REGION, 0xee);
    await o.disk.read(first * REGION, tail);
    assert.ok(tail.every((b) => b === 0));
    assert.equal(origin.stats.bytesSent, before, 'nothing past the image is fetched');
    // The straddling region: the image's last bytes, then zeros.
    const straddle = Buffer.alloc(REGION, 0xee);
    await o.disk.read((first - 1) * REGION, straddle);
    const inImage = IMAGE - (first - 1) * REGION;
    assert.ok(straddle.subarray(0, inImage).equals(model.subarray((first - 1) * REGION)));
    assert.ok(straddle.subarray(inImage).every((b) => b === 0));

    const done = once(o.disk, 'complete');
    o.hydrator.start();
    await done;
    assert.ok(o.disk.progress().bytesFetched <= IMAGE, `fetched ${o.disk.progress().bytesFetched} bytes of a ${IMAGE}-byte image`);
    const target = fs.readFileSync(path.join(tmp.dir, 'plain.target'));
    assert.equal(target.length, DISK);
    assert.ok(target.subarray(0, IMAGE).equals(model));
    assert.ok(target.subarray(IMAGE).every((b) => b === 0));
  });

  it('the image\'s manifest verifies the larger disk, and catches a corrupted straddling region', async () => {
    const src = await HttpSource.open({ url });
    const manifest = await Manifest.build(src, { regionSize: REGION });
    await src.close();
    assert.equal(manifest.size, IMAGE);
    const o = await openDisk('verified', DISK, manifest);
    const straddling = Math.floor(IMAGE / REGION);
    origin.faults.push('corrupt');
    const buf = Buffer.alloc(REGION);
    await o.disk.read(straddling * REGION, buf); // first answer corrupted, refetched
    assert.ok(buf.subarray(0, IMAGE - straddling * REGION).equals(model.subarray(straddling * REGION)));
    assert.ok(o.disk.progress().integrityFailures >= 1, 'the corrupted answer was caught');
    const done = once(o.disk, 'complete');
    o.hydrator.start();
    await done;
    await o.disk.whenVerified();
    assert.equal(o.disk.progress().verified, true);
    // Reopen: the disk keeps its size, and refuses another.
    await o.close();
    open.splice(open.indexOf(o), 1);
    const again = await openDisk('verified', undefined);
    assert.equal(again.disk.size, DISK);
    await again.close();
    open.splice(open.indexOf(again), 1);
  });

  it('a disk smaller than the image, or another size for an existing disk, is refused', async () => {
    await assert.rejects(openDisk('small', IMAGE - 512), (e: unknown) => e instanceof DpuError && e.code === 'DPU_ERR_DISK_TOO_SMALL' && /at least the image's/.test(e.message));
    const o = await openDisk('resized', DISK);
    await o.close();
    open.splice(open.indexOf(o), 1);
    await assert.rejects(openDisk('resized', DISK * 2), (e: unknown) => e instanceof DpuError && e.code === 'DPU_ERR_SOURCE_MISMATCH');
  });
});

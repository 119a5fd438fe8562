/**
 * The HTTP range source's background requests (issue #14 part 2): a background read goes
 * out as requests of ~2 ms of link time, sized from the rate background bytes arrive at, so
 * the origin never puts a whole batch ahead of a host's miss; foreground reads are one
 * request each, on a pool of their own. Against the suite's real HTTP origin on loopback,
 * rate-capped so the link's rate is known.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { backgroundRequestBytes, HttpSource } from '../../image-access/src/http-source.js';
import { tempDir } from '../helpers/agent.js';
import { TestOrigin } from '../helpers/origin.js';

const MiB = 1 << 20;

describe('HTTP source: background requests sized to the link', () => {
  let dir: string;
  let cleanup: () => void;
  let origin: TestOrigin;
  let img: Buffer;
  const asked: { start: number; end: number }[] = [];

  before(async () => {
    ({ dir, cleanup } = tempDir('http-source'));
    img = Buffer.alloc(8 * MiB);
    for (let i = 0; i < img.length; i += 4) img.writeUInt32LE((Math.imul(i + 5, 2654435761) | 1) >>> 0, i);
    const file = path.join(dir, 'disk.raw');
    fs.writeFileSync(file, img);
    origin = new TestOrigin({ file, rate: 20 * MiB, plan: (r) => void asked.push(r) });
    await origin.start();
  });
  after(async () => {
    await origin.stop();
    cleanup();
  });
  beforeEach(() => {
    asked.length = 0;
  });

  it('sizes requests to 2 ms of the rate, in 64 KiB steps from 256 KiB to 8 MiB', () => {
    assert.equal(backgroundRequestBytes(125e6, 2), 256 << 10, '1 Gbit/s');
    assert.equal(backgroundRequestBytes(1.25e9, 2), 2432 << 10, '10 Gbit/s');
    assert.equal(backgroundRequestBytes(12.5e6, 2), 256 << 10, '100 Mbit/s: the floor');
    assert.equal(backgroundRequestBytes(50e9, 2), 8 << 20, '400 Gbit/s: the ceiling');
  });

  it('a background read is split into requests that shrink to the measured rate; the bytes are exact', async () => {
    const src = await HttpSource.open({ url: origin.url });
    try {
      const buf = Buffer.alloc(4 * MiB);
      let last = 0;
      await src.read(MiB, buf, { priority: 'background', onProgress: (n) => (last = n) });
      assert.ok(buf.equals(img.subarray(MiB, 5 * MiB)));
      assert.equal(last, 4 * MiB);
      const sizes = asked.map((r) => r.end - r.start + 1);
      assert.ok(sizes.length > 4, `several requests (${sizes.join(', ')})`);
      assert.equal(sizes[0], MiB, 'the first request, before any rate is known');
      // The origin sends at most 20 MiB/s: 2 ms of it is 40 KiB, below the 256 KiB floor.
      // The last request is the read's tail (what is left, however short): not sized, not checked.
      assert.ok(sizes.slice(-4, -1).every((n) => n === 256 << 10), `later requests follow the rate down to the floor (${sizes.join(', ')})`);
      assert.equal(src.backgroundRequestSize, 256 << 10);
      for (let i = 1; i < asked.length; i++) assert.equal(asked[i]!.start, asked[i - 1]!.end + 1, 'one after another, in order');
    } finally {
      await src.close();
    }
  });

  it('a foreground read is one request; backgroundRequestMs 0 sends a background read whole', async () => {
    const src = await HttpSource.open({ url: origin.url, backgroundRequestMs: 0 });
    try {
      const buf = Buffer.alloc(2 * MiB);
      await src.read(0, buf, { priority: 'foreground' });
      await src.read(2 * MiB, buf, { priority: 'background' });
      assert.ok(buf.equals(img.subarray(2 * MiB, 4 * MiB)));
      assert.deepEqual(asked.map((r) => [r.start, r.end]), [[0, 2 * MiB - 1], [2 * MiB, 4 * MiB - 1]]);
    } finally {
      await src.close();
    }
  });
});

/**
 * Qcow2Source against images made by the real qemu-img: headers of versions 2 and 3,
 * every read equal to the raw image (plain, compressed, small and large clusters, a size
 * that is not a whole number of clusters), progress that only ever reports final bytes,
 * zero ranges, and a clear refusal for every feature the agent cannot serve.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { DpuError } from '../../image-access/src/errors.js';
import { parseQcow2Header, Qcow2Source, type Qcow2Header } from '../../image-access/src/qcow2.js';
import { tempDir } from '../helpers/agent.js';
import { ControlledSource, settleTicks } from '../helpers/controlled-source.js';
import { type ConvertOptions, FileSource, makeMixedImage, toQcow2 } from '../helpers/qcow2-images.js';
import { run } from '../helpers/run.js';

/** Not a whole number of 64 KiB clusters (the last one is cut) but whole 512-byte sectors. */
const RAW_SIZE = (6 << 20) + 4608;

const VARIANTS: { name: string; opts: ConvertOptions }[] = [
  { name: 'v3', opts: {} },
  { name: 'v3 compressed', opts: { compressed: true } },
  { name: 'v2', opts: { compat: '0.10' } },
  { name: 'v2 compressed', opts: { compat: '0.10', compressed: true } },
  { name: 'v3 compressed, 4 KiB clusters', opts: { compressed: true, clusterSize: 4096 } },
  { name: 'v3, 512-byte clusters', opts: { clusterSize: 512 } },
  { name: 'v3 compressed, 2 MiB clusters', opts: { compressed: true, clusterSize: 2 << 20 } },
];

function header(file: string): Qcow2Header {
  const parsed = parseQcow2Header(fs.readFileSync(file).subarray(0, 64 << 10));
  assert.ok(!('need' in parsed));
  return parsed;
}

async function refusal(file: string): Promise<DpuError> {
  const inner = new FileSource(file);
  try {
    await Qcow2Source.open(inner);
  } catch (err) {
    assert.ok(err instanceof DpuError, String(err));
    return err;
  } finally {
    await inner.close();
  }
  assert.fail(`${path.basename(file)} was opened`);
}

describe('qcow2 source', function () {
  this.timeout(60_000);
  let dir: string;
  let cleanup: () => void;
  let raw: Buffer;
  const files = new Map<string, string>();

  before(async () => {
    ({ dir, cleanup } = tempDir('qcow2-unit'));
    makeMixedImage(path.join(dir, 'disk.raw'), RAW_SIZE);
    raw = fs.readFileSync(path.join(dir, 'disk.raw'));
    await Promise.all(
      VARIANTS.map(async (v, i) => {
        const f = path.join(dir, `img${i}.qcow2`);
        await toQcow2(path.join(dir, 'disk.raw'), f, v.opts);
        files.set(v.name, f);
      }),
    );
  });
  after(() => cleanup());

  it('parses the headers of version 2 and 3 images made by qemu-img', () => {
    const v3 = header(files.get('v3')!);
    assert.equal(v3.version, 3);
    assert.equal(v3.clusterSize, 65536);
    assert.equal(v3.size, RAW_SIZE);
    assert.equal(v3.compressionType, 0);
    assert.ok(v3.headerLength >= 104);
    assert.equal(v3.backingFile, null);
    assert.ok(v3.featureNames.get('incompatible:0') === 'dirty bit', 'the feature name table is read');
    const v2 = header(files.get('v2')!);
    assert.equal(v2.version, 2);
    assert.equal(v2.headerLength, 72);
    assert.equal(v2.size, RAW_SIZE);
    assert.deepEqual(v2.incompatibleBits, []);
    assert.equal(header(files.get('v3, 512-byte clusters')!).clusterSize, 512);
    assert.equal(header(files.get('v3 compressed, 2 MiB clusters')!).clusterBits, 21);
  });

  for (const v of VARIANTS) {
    it(`serves ${v.name} as the raw disk, with final bytes behind every progress report`, async () => {
      const file = files.get(v.name)!;
      const inner = new FileSource(file);
      const src = await Qcow2Source.open(inner, { l2CacheBytes: 64 << 10 });
      try {
        assert.equal(src.size, RAW_SIZE);
        assert.equal(src.identity, `${inner.identity};qcow2`);
        const check = async (offset: number, length: number, priority: 'foreground' | 'background'): Promise<void> => {
          const dest = Buffer.alloc(length, 0xee);
          let last = 0;
          await src.read(offset, dest, {
            priority,
            onProgress: (filled) => {
              assert.ok(filled > last && filled <= length, `progress ${filled} after ${last} of ${length}`);
              assert.ok(dest.subarray(last, filled).equals(raw.subarray(offset + last, offset + filled)), `bytes ${offset + last}-${offset + filled} final when reported`);
              last = filled;
            },
          });
          assert.equal(last, length, 'progress reached the end');
          assert.ok(dest.equals(raw.subarray(offset, offset + length)), `bytes ${offset}+${length}`);
        };
        // A sequential pass in 1 MiB regions, as hydration reads it.
        const before = inner.bytesFetched;
        for (let off = 0; off < RAW_SIZE; off += 1 << 20) await check(off, Math.min(1 << 20, RAW_SIZE - off), 'background');
        const pass = inner.bytesFetched - before;
        const fileSize = fs.statSync(file).size;
        assert.ok(pass <= fileSize, `a full pass fetched ${pass} bytes of a ${fileSize}-byte file`);
        // Everything in one read, odd ranges, and reads that cut clusters.
        await check(0, RAW_SIZE, 'background');
        let x = 12345;
        const rnd = (n: number): number => ((x = (x * 1103515245 + 12345) >>> 0) % n);
        const reads: Promise<void>[] = [];
        for (let i = 0; i < 40; i++) {
          const off = rnd(RAW_SIZE);
          reads.push(check(off, 1 + rnd(Math.min(300_000, RAW_SIZE - off)), 'foreground'));
        }
        await Promise.all(reads);
        await check(RAW_SIZE - 4096, 4096, 'foreground');
      } finally {
        await src.close();
      }
    });
  }

  it('finds the zero ranges without fetching data clusters', async () => {
    const inner = new FileSource(files.get('v3 compressed')!);
    const src = await Qcow2Source.open(inner);
    try {
      const zeros = await src.zeroRanges();
      let total = 0;
      for (const z of zeros) {
        assert.ok(raw.subarray(z.offset, z.offset + z.length).every((b) => b === 0), `range ${z.offset}+${z.length} reads as zeros`);
        total += z.length;
      }
      const stretch = { start: Math.ceil((RAW_SIZE * 0.4) / 65536) * 65536, end: Math.floor((RAW_SIZE * 0.5) / 65536) * 65536 };
      assert.ok(zeros.some((z) => z.offset <= stretch.start && z.offset + z.length >= stretch.end), 'the zero stretch is one range');
      assert.ok(total >= stretch.end - stretch.start, `${total} zero bytes`);
      assert.ok(inner.bytesFetched < 256 << 10, `only metadata fetched (${inner.bytesFetched} bytes)`);
    } finally {
      await src.close();
    }
  });

  it('a host read never waits on a background fetch of the L2 table it needs: it fetches the table in the foreground', async () => {
    // Priority inversion: the background fetch of an L2 table can be held back by the
    // source (it yields to the host's reads). A host read needing the same table must not
    // queue behind it.
    const img = fs.readFileSync(files.get('v3')!);
    const h = header(files.get('v3')!);
    const l2Host = Number(img.readBigUInt64BE(h.l1Offset) & 0x00fffffffffffe00n);
    const ctrl = new ControlledSource(img);
    const deliverAll = (): void => {
      for (const p of ctrl.pending) if (p.offset !== l2Host || p.priority === 'foreground') ctrl.deliver(p);
    };
    ctrl.on('read', (p) => {
      if (p.offset !== l2Host) ctrl.deliver(p); // header, L1, data: answered at once
    });
    const src = await Qcow2Source.open(ctrl, { l2CacheBytes: 64 << 10 });
    const zeros = src.zeroRanges(); // reads the L2 table in the background class: held
    const bg = await ctrl.next((p) => p.offset === l2Host && p.priority === 'background');
    const dest = Buffer.alloc(4096);
    const hostRead = src.read(4096, dest, { priority: 'foreground' });
    await settleTicks();
    const fg = ctrl.pending.find((p) => p.offset === l2Host && p.priority === 'foreground');
    assert.ok(fg, 'the host read fetches the L2 table itself, in the foreground');
    ctrl.deliver(fg);
    deliverAll();
    await hostRead;
    assert.ok(dest.equals(raw.subarray(4096, 8192)));
    assert.equal(bg.settled, false, 'answered while the background fetch is still held');
    ctrl.deliver(bg);
    await zeros;
    // Later host reads of the table hit the cache: nothing more is fetched for it.
    const before = ctrl.reads.filter((p) => p.offset === l2Host).length;
    await src.read(8192, dest, { priority: 'foreground' });
    assert.equal(ctrl.reads.filter((p) => p.offset === l2Host).length, before);
    await src.close();
  });

  it('serves the active state of an image with an internal snapshot, and an image left dirty', async () => {
    // Snapshot, then overwrite 1 MiB: the active L1 differs from the snapshot's.
    const snap = path.join(dir, 'snap.qcow2');
    await toQcow2(path.join(dir, 'disk.raw'), snap);
    await run('qemu-img', ['snapshot', '-c', 's1', snap]);
    await run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0xaa 65536 1M', snap]);
    await run('qemu-img', ['convert', '-O', 'raw', snap, path.join(dir, 'snap.raw')]);
    const expected = fs.readFileSync(path.join(dir, 'snap.raw'));
    assert.equal(header(snap).nbSnapshots, 1);
    const s1 = await Qcow2Source.open(new FileSource(snap));
    try {
      const got = Buffer.alloc(RAW_SIZE);
      await s1.read(0, got, { priority: 'foreground' });
      assert.ok(got.equals(expected), 'the active state, not the snapshot');
    } finally {
      await s1.close();
    }
    // lazy_refcounts and a crash (abort) leave the dirty bit set; reading needs no refcounts.
    const dirty = path.join(dir, 'dirty.qcow2');
    await run('qemu-img', ['create', '-f', 'qcow2', '-o', 'lazy_refcounts=on', dirty, '4M']);
    await run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x55 0 128k', '-c', 'abort', dirty], { allowFail: true });
    assert.deepEqual(header(dirty).incompatibleBits, [0]);
    const s2 = await Qcow2Source.open(new FileSource(dirty));
    try {
      const got = Buffer.alloc(256 << 10);
      await s2.read(0, got, { priority: 'foreground' });
      assert.ok(got.subarray(0, 128 << 10).every((b) => b === 0x55) && got.subarray(128 << 10).every((b) => b === 0));
    } finally {
      await s2.close();
    }
  });

  it('reads a sparse 200 TiB disk past cluster number 2^31', async () => {
    const big = path.join(dir, 'big.qcow2');
    const at = 190 * 2 ** 40 + 3 * 65536;
    await run('qemu-img', ['create', '-f', 'qcow2', big, '200T']);
    await run('qemu-io', ['-f', 'qcow2', '-c', `write -P 0x5a ${at} 64k`, big]);
    const src = await Qcow2Source.open(new FileSource(big));
    try {
      assert.equal(src.size, 200 * 2 ** 40);
      assert.ok(at / 65536 > 2 ** 31);
      const got = Buffer.alloc(192 << 10, 1);
      await src.read(at - 65536, got, { priority: 'foreground' });
      assert.ok(got.subarray(0, 65536).every((b) => b === 0), 'zeros before');
      assert.ok(got.subarray(65536, 131072).every((b) => b === 0x5a), 'the written cluster');
      assert.ok(got.subarray(131072).every((b) => b === 0), 'zeros after');
    } finally {
      await src.close();
    }
  });

  it('answers a damaged compressed cluster with DPU_ERR_IMAGE_CORRUPT, never with bytes', async () => {
    // Shrink the first compressed cluster's stored size to one sector: its deflate stream
    // is then cut short and cannot inflate to a whole cluster.
    const file = path.join(dir, 'damaged.qcow2');
    fs.copyFileSync(files.get('v3 compressed')!, file);
    const img = fs.readFileSync(file);
    const h = header(file);
    const l2 = Number(img.readBigUInt64BE(h.l1Offset) & 0x00fffffffffffe00n);
    let victim = -1;
    for (let e = 0; e < h.clusterSize / 8; e++) {
      const entry = img.readBigUInt64BE(l2 + e * 8);
      if (entry & (1n << 62n)) {
        const x = 62n - BigInt(h.clusterBits - 8);
        img.writeBigUInt64BE(entry & ~(((1n << BigInt(h.clusterBits - 8)) - 1n) << x), l2 + e * 8);
        victim = e;
        break;
      }
    }
    assert.ok(victim >= 0, 'a compressed cluster exists');
    fs.writeFileSync(file, img);
    const src = await Qcow2Source.open(new FileSource(file));
    try {
      await assert.rejects(src.read(victim * h.clusterSize, Buffer.alloc(4096), { priority: 'foreground' }), (err: DpuError) => {
        assert.equal(err.code, 'DPU_ERR_IMAGE_CORRUPT');
        assert.match(err.message, new RegExp(`virtual ${victim * h.clusterSize}`));
        return true;
      });
    } finally {
      await src.close();
    }
  });

  describe('refuses, naming the feature and what to do', () => {
    it('a backing file', async () => {
      const f = path.join(dir, 'overlay.qcow2');
      await run('qemu-img', ['create', '-f', 'qcow2', '-b', path.join(dir, 'disk.raw'), '-F', 'raw', f]);
      const err = await refusal(f);
      assert.equal(err.code, 'DPU_ERR_IMAGE_UNSUPPORTED');
      assert.match(err.message, /backing file \(".*disk\.raw", raw\).*qemu-img convert -O qcow2/);
    });

    it('LUKS encryption', async () => {
      const f = path.join(dir, 'luks.qcow2');
      // A short PBKDF benchmark keeps this fast; qemu-img's benchmark now and then fails
      // with "Unable to get accurate CPU usage" on a busy machine, so it is given 3 tries.
      const args = ['create', '-f', 'qcow2', '--object', 'secret,id=sec0,data=123456', '-o', 'encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10', f, '4M'];
      for (let attempt = 1; ; attempt++) {
        const r = await run('qemu-img', args, { allowFail: attempt < 3 });
        if (r.code === 0) break;
      }
      const err = await refusal(f);
      assert.equal(err.code, 'DPU_ERR_IMAGE_UNSUPPORTED');
      assert.match(err.message, /encrypted \(LUKS\).*cannot decrypt/);
    });

    it('legacy AES encryption', async () => {
      const f = path.join(dir, 'aes.qcow2');
      await run('qemu-img', ['create', '-f', 'qcow2', '--object', 'secret,id=sec0,data=123456', '-o', 'encrypt.format=aes,encrypt.key-secret=sec0', f, '4M']);
      const err = await refusal(f);
      assert.equal(err.code, 'DPU_ERR_IMAGE_UNSUPPORTED');
      assert.match(err.message, /encrypted \(AES\)/);
    });

    it('an external data file', async () => {
      const f = path.join(dir, 'external.qcow2');
      await run('qemu-img', ['create', '-f', 'qcow2', '-o', `data_file=${path.join(dir, 'external.data')}`, f, '4M']);
      const err = await refusal(f);
      assert.equal(err.code, 'DPU_ERR_IMAGE_UNSUPPORTED');
      assert.match(err.message, /external data file \(".*external\.data"\).*qemu-img convert/);
    });

    it('zstd compression', async () => {
      const f = path.join(dir, 'zstd.qcow2');
      await run('qemu-img', ['create', '-f', 'qcow2', '-o', 'compression_type=zstd', f, '4M']);
      const err = await refusal(f);
      assert.equal(err.code, 'DPU_ERR_IMAGE_UNSUPPORTED');
      assert.match(err.message, /zstd.*compression_type=zlib/);
    });

    it('extended L2 entries', async () => {
      const f = path.join(dir, 'extl2.qcow2');
      await run('qemu-img', ['create', '-f', 'qcow2', '-o', 'extended_l2=on', f, '4M']);
      const err = await refusal(f);
      assert.equal(err.code, 'DPU_ERR_IMAGE_UNSUPPORTED');
      assert.match(err.message, /extended L2 entries.*extended_l2=off/);
    });

    it('an unknown incompatible feature bit, by the name the image gives it', async () => {
      const f = path.join(dir, 'future.qcow2');
      fs.copyFileSync(files.get('v3')!, f);
      const img = fs.readFileSync(f);
      img.writeUInt32BE(img.readUInt32BE(76) | (1 << 9), 76);
      fs.writeFileSync(f, img);
      const err = await refusal(f);
      assert.equal(err.code, 'DPU_ERR_IMAGE_UNSUPPORTED');
      assert.match(err.message, /incompatible feature bit 9/);
    });

    it('a raw image given as qcow2', async () => {
      const err = await refusal(path.join(dir, 'disk.raw'));
      assert.equal(err.code, 'DPU_ERR_IMAGE_CORRUPT');
      assert.match(err.message, /not a qcow2 image.*format raw/);
    });
  });
});

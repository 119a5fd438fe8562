/**
 * The local target's writes off the event loop (dpu-agent/src/local/target.ts). Hydration
 * writes each fetched region as it lands, several at once; on a file target every buffered
 * write takes the inode's lock, and threads waiting for it spin. Measured hydrating 1 GiB
 * across an emulated 10 Gbit/s link into an ext4 file: the thread pool's four threads spent
 * 2.4 s of system time writing it, one thread 0.4–0.7 s. The target now hands the kernel
 * one write at a time, in the order they were asked for; this pins that down by counting
 * the writes in flight in the thread pool, not by timing them.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { LocalTarget } from '../../dpu-agent/src/local/target.js';
import { tempDir } from '../helpers/agent.js';

const MiB = 1 << 20;

describe('LocalTarget: writes through the thread pool', () => {
  let dir: string;
  let cleanup: () => void;
  const realWrite = fs.write;
  beforeEach(() => ({ dir, cleanup } = tempDir('local-target')));
  afterEach(() => {
    fs.write = realWrite;
    cleanup();
  });

  /** Counts fs.write calls in flight (the thread pool's), and the most at once. */
  function countWrites(): { most: number; calls: number[] } {
    const seen = { most: 0, calls: [] as number[] };
    let now = 0;
    fs.write = ((fd: number, buf: Buffer, off: number, len: number, pos: number, cb: (err: NodeJS.ErrnoException | null, n: number) => void) => {
      seen.most = Math.max(seen.most, ++now);
      seen.calls.push(pos);
      realWrite(fd, buf, off, len, pos, (err, n) => {
        now--;
        cb(err, n);
      });
    }) as typeof fs.write;
    return seen;
  }

  it('hands the kernel one write at a time, in the order asked, and every byte lands', async () => {
    const file = path.join(dir, 'target.raw');
    const t = LocalTarget.open(file, { create: true, size: 16 * MiB });
    try {
      const seen = countWrites();
      const bufs = Array.from({ length: 12 }, (_, i) => Buffer.alloc(MiB, i + 1));
      // Out of order on the disk, as hydration and a host's misses write them.
      const order = [3, 0, 7, 1, 11, 2, 9, 4, 5, 10, 6, 8];
      await Promise.all(order.map((i) => t.write!(bufs[i]!, i * MiB)));
      assert.equal(seen.most, 1, 'one write in the thread pool at a time');
      assert.deepEqual(seen.calls, order.map((i) => i * MiB), 'in the order they were asked for');
      const back = fs.readFileSync(file);
      for (let i = 0; i < 12; i++) assert.ok(back.subarray(i * MiB, (i + 1) * MiB).equals(bufs[i]!), `region ${i}`);
    } finally {
      t.close();
    }
  });

  it("a write asked for `first` (a missed region the host waits for) goes ahead of those waiting, not of the one in the thread pool", async () => {
    const file = path.join(dir, 'target.raw');
    const t = LocalTarget.open(file, { create: true, size: 8 * MiB });
    try {
      const seen = countWrites();
      const writes = [0, 1, 2, 3].map((i) => t.write!(Buffer.alloc(MiB, i + 1), i * MiB));
      writes.push(t.write!(Buffer.alloc(MiB, 9), 5 * MiB, true));
      await Promise.all(writes);
      assert.deepEqual(seen.calls, [0, 5, 1, 2, 3].map((i) => i * MiB));
      assert.equal(seen.most, 1);
      assert.equal(fs.readFileSync(file)[5 * MiB], 9);
    } finally {
      t.close();
    }
  });

  it('a failed write rejects its own promise only; the writes queued behind it still run', async () => {
    const file = path.join(dir, 'target.raw');
    const t = LocalTarget.open(file, { create: true, size: 4 * MiB });
    try {
      const seen = countWrites();
      const inner = fs.write;
      let failNext = true;
      fs.write = ((fd: number, buf: Buffer, off: number, len: number, pos: number, cb: (err: NodeJS.ErrnoException | null, n: number) => void) => {
        if (failNext) {
          failNext = false;
          const err = Object.assign(new Error('EIO: i/o error, write'), { code: 'EIO' });
          return void setImmediate(() => cb(err, 0));
        }
        inner(fd, buf, off, len, pos, cb);
      }) as typeof fs.write;
      const results = await Promise.allSettled([t.write!(Buffer.alloc(MiB, 1), 0), t.write!(Buffer.alloc(MiB, 2), MiB), t.write!(Buffer.alloc(MiB, 3), 2 * MiB)]);
      assert.deepEqual(
        results.map((r) => r.status),
        ['rejected', 'fulfilled', 'fulfilled'],
      );
      assert.match(String((results[0] as PromiseRejectedResult).reason), /EIO/);
      assert.equal(seen.most, 1);
      const back = fs.readFileSync(file);
      assert.equal(back[MiB], 2);
      assert.equal(back[2 * MiB], 3);
    } finally {
      t.close();
    }
  });
});

/**
 * The pacing of answers to peers (dpu-agent/src/daemon/send-pacer.ts, peers.serve_bandwidth):
 * the shared budget's arithmetic on a given clock, and streams that carry exactly their
 * bytes and stop cleanly. How fast bytes really go is a benchmark's business (bench/fleet.ts).
 */
import assert from 'node:assert/strict';
import type { BlockBackend } from '../../dpu-agent/src/block/backend.js';
import { countHostRequests, HostActivity } from '../../dpu-agent/src/block/host-activity.js';
import { SendPacer } from '../../dpu-agent/src/daemon/send-pacer.js';

describe('send pacer (peers.serve_bandwidth)', () => {
  it('one budget over every answer: each reservation starts where the last one ends, none is saved up while idle', () => {
    const p = new SendPacer({ rate: 1 << 20 }); // 1 MiB/s
    assert.equal(p.reserve(1 << 19, 1000), 0, 'an idle budget sends at once');
    assert.equal(p.reserve(1 << 19, 1000), 500, 'the next half MiB goes when the first has had its time');
    assert.equal(p.reserve(1 << 20, 1200), 800, 'another answer queues behind both');
    assert.equal(p.reserve(1, 10_000), 0, 'after a long idle time: at once');
    assert.equal(p.reserve(1 << 20, 10_000), 1000 / (1 << 20), 'and no credit was saved up: the 1 B before it is owed');
  });

  it('a stream carries exactly its bytes, in order; destroyed midway, it stops', async () => {
    const data = Buffer.alloc(300 << 10);
    for (let i = 0; i < data.length; i++) data[i] = (i * 7) & 0xff;
    const p = new SendPacer({ rate: 1 << 30 });
    const got: Buffer[] = [];
    for await (const chunk of p.stream(data)) got.push(chunk as Buffer);
    assert.ok(Buffer.concat(got).equals(data));
    const slow = new SendPacer({ rate: 64 << 10 }); // a piece a second: the second piece waits
    const s = slow.stream(data);
    const first = await new Promise<Buffer>((resolve) => s.once('data', resolve));
    assert.equal(first.length, 64 << 10);
    s.pause();
    s.destroy();
    await new Promise((r) => s.once('close', r));
    assert.equal(s.destroyed, true);
  });
});

/** Lets every pending timer-free callback run (promises, immediates): no clock involved. */
const ticks = async (n = 5): Promise<void> => {
  for (let i = 0; i < n; i++) await new Promise((r) => setImmediate(r));
};

describe('serving peers yields to the host (peers.host_yield_ms)', () => {
  it('a wait ends once the host has had no request in flight for its quiet time, and not before', async () => {
    const host = new HostActivity();
    assert.equal(host.whenQuiet(60_000), null, 'an idle host: at once');
    host.begin();
    host.begin();
    let settled = false;
    const p = host.whenQuiet(60_000)!.then(() => (settled = true));
    assert.ok(p);
    host.end();
    await ticks();
    assert.equal(settled, false, 'one request is still in flight');
    host.end();
    await p;
    assert.equal(host.busy, false);
    assert.equal(host.holds, 1);
    assert.ok(host.heldMs > 0);
  });

  it('a host that never pauses still lets each wait go after its limit (the floor); 0 never waits', async () => {
    const host = new HostActivity();
    host.begin();
    assert.equal(host.whenQuiet(0), null);
    const held = host.whenQuiet(20);
    assert.ok(held, 'a busy host holds the wait');
    await held;
    assert.equal(host.holds, 1);
    assert.equal(host.busy, true, 'let go while the host was still busy');
    host.end();
  });

  it('an answer sends no piece while the host is busy; once it pauses, every byte goes, in order', async () => {
    const host = new HostActivity();
    const data = Buffer.alloc(200 << 10);
    for (let i = 0; i < data.length; i++) data[i] = (i * 13) & 0xff;
    host.begin();
    const s = new SendPacer({ rate: 0, host, holdMs: 60_000 }).stream(data);
    const got: Buffer[] = [];
    s.on('data', (c: Buffer) => got.push(c));
    const ended = new Promise((r) => s.once('end', r));
    await ticks(20);
    assert.equal(got.length, 0, 'held while a request is in flight');
    host.end();
    await ended;
    assert.ok(Buffer.concat(got).equals(data));
  });

  it('an answer destroyed while it waits for the host leaves no wait behind', async () => {
    const host = new HostActivity();
    host.begin();
    const s = new SendPacer({ rate: 0, host, holdMs: 60_000 }).stream(Buffer.alloc(256 << 10));
    s.on('data', () => assert.fail('no piece while the host is busy'));
    await ticks();
    assert.equal(host.waiting, 1, 'its first piece waits');
    s.destroy();
    await new Promise((r) => s.once('close', r));
    assert.equal(host.waiting, 0);
    host.end();
  });

  it('a request that fails still ends, and its rejection reaches the caller only', async () => {
    const host = new HostActivity();
    const unhandled: unknown[] = [];
    const onUnhandled = (e: unknown): void => void unhandled.push(e);
    process.on('unhandledRejection', onUnhandled);
    try {
      const failing = { read: () => Promise.reject(new Error('EIO')) } as unknown as BlockBackend;
      const b = countHostRequests(failing, host);
      await assert.rejects(b.read(0, Buffer.alloc(512)) as Promise<void>, /EIO/);
      const held = host.whenQuiet(60_000);
      if (held) await held; // ends once the quiet time has passed: nothing is left in flight
      assert.equal(host.busy, false);
      await ticks();
      assert.deepEqual(unhandled, []);
    } finally {
      process.off('unhandledRejection', onUnhandled);
    }
  });

  it('counts the host\'s requests through its backend: calls that return a promise, until they settle; not prefetches', async () => {
    const host = new HostActivity();
    const pending: (() => void)[] = [];
    const later = (): Promise<void> => new Promise<void>((r) => pending.push(r));
    const backend: BlockBackend = {
      size: 1 << 20,
      capabilities: { readOnly: false, flush: true, fua: true, trim: true, writeZeroes: true, fastZero: false, cache: true, multiConn: false },
      read: () => later(),
      write: () => undefined,
      flush: () => later(),
      trim: () => later(),
      writeZeroes: () => later(),
      cache: () => later(),
      close: async () => undefined,
    };
    // A request answered at once (a pread of local regions) starts the quiet time over: a
    // quiet time of a minute here, so that "busy" cannot have ended by the assertion.
    const slowToQuiet = new HostActivity(60_000);
    const s = countHostRequests(backend, slowToQuiet);
    assert.equal(slowToQuiet.busy, false);
    assert.equal(s.write(0, [Buffer.alloc(512)], 512, false), undefined);
    assert.equal(slowToQuiet.busy, true, 'a request just answered');

    const b = countHostRequests(backend, host);
    assert.equal(b.size, 1 << 20);
    const r = b.read(0, Buffer.alloc(512)) as Promise<void>;
    void b.cache(0, 4096);
    assert.equal(host.busy, true);
    pending.shift()!(); // the read
    await r;
    await ticks();
    // The prefetch is still pending, and does not count.
    const held = host.whenQuiet(60_000);
    if (held) await held;
    assert.equal(host.busy, false);
    assert.equal(pending.length, 1, 'the prefetch is still in flight');
  });
});

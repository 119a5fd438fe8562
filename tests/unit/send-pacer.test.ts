/**
 * The pacing of answers to peers (dpu-agent/src/daemon/send-pacer.ts, peers.serve_bandwidth):
 * the shared budget's arithmetic on a given clock, and streams that carry exactly their
 * bytes and stop cleanly. How fast bytes really go is a benchmark's business (bench/fleet.ts).
 */
import assert from 'node:assert/strict';
import { SendPacer } from '../../dpu-agent/src/daemon/send-pacer.js';

describe('send pacer (peers.serve_bandwidth)', () => {
  it('one budget over every answer: each reservation starts where the last one ends, none is saved up while idle', () => {
    const p = new SendPacer(1 << 20); // 1 MiB/s
    assert.equal(p.reserve(1 << 19, 1000), 0, 'an idle budget sends at once');
    assert.equal(p.reserve(1 << 19, 1000), 500, 'the next half MiB goes when the first has had its time');
    assert.equal(p.reserve(1 << 20, 1200), 800, 'another answer queues behind both');
    assert.equal(p.reserve(1, 10_000), 0, 'after a long idle time: at once');
    assert.equal(p.reserve(1 << 20, 10_000), 1000 / (1 << 20), 'and no credit was saved up: the 1 B before it is owed');
  });

  it('a stream carries exactly its bytes, in order; destroyed midway, it stops', async () => {
    const data = Buffer.alloc(300 << 10);
    for (let i = 0; i < data.length; i++) data[i] = (i * 7) & 0xff;
    const p = new SendPacer(1 << 30);
    const got: Buffer[] = [];
    for await (const chunk of p.stream(data)) got.push(chunk as Buffer);
    assert.ok(Buffer.concat(got).equals(data));
    const slow = new SendPacer(64 << 10); // a piece a second: the second piece waits
    const s = slow.stream(data);
    const first = await new Promise<Buffer>((resolve) => s.once('data', resolve));
    assert.equal(first.length, 64 << 10);
    s.pause();
    s.destroy();
    await new Promise((r) => s.once('close', r));
    assert.equal(s.destroyed, true);
  });
});

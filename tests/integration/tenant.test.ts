/**
 * Tenant isolation: a target that still holds the previous tenant's whole image (undeployed
 * without a wipe) is reused for another image. Through the export, no byte of the previous
 * image is ever readable — not before hydration, not through partial writes (read-modify-write
 * must fetch, not reuse the old bytes), not after TRIM or WRITE_ZEROES, not after a crash.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { AgentProcess, makeImage, nbdUri, tempDir } from '../helpers/agent.js';
import { TestOrigin } from '../helpers/origin.js';
import { run } from '../helpers/run.js';

const MiB = 1 << 20;

describe('tenant isolation on a reused target', function () {
  this.timeout(120_000);
  let dir: string;
  let cleanup: () => void;
  const agents: AgentProcess[] = [];

  before(() => ({ dir, cleanup } = tempDir('tenant')));
  after(async () => {
    for (const a of agents) await a.kill();
    cleanup();
  });

  it('never serves a byte of the previous image', async () => {
    const imgA = path.join(dir, 'a.raw');
    const imgB = path.join(dir, 'b.raw');
    makeImage(imgA, 24 * MiB, 101);
    makeImage(imgB, 24 * MiB, 202);
    const a = fs.readFileSync(imgA);
    const b = fs.readFileSync(imgB);
    const target = path.join(dir, 'nvme.raw');

    // Tenant A: fully hydrated onto the target, then "undeployed" without a wipe.
    const originA = new TestOrigin({ file: imgA });
    await originA.start();
    const first = new AgentProcess({ source: originA.url, target, state: path.join(dir, 'state-a'), socket: path.join(dir, 'a.sock') });
    agents.push(first);
    await first.complete();
    await first.stop();
    await originA.stop();
    assert.ok(fs.readFileSync(target).equals(a), 'the target holds all of A');

    // Tenant B on the same target with a fresh state directory; no background copy, so
    // every read of a region the host has not touched must come from B's origin.
    const originB = new TestOrigin({ file: imgB });
    await originB.start();
    const sock = path.join(dir, 'b.sock');
    const second = new AgentProcess({ source: originB.url, target, state: path.join(dir, 'state-b'), socket: sock, extra: ['--no-hydrate'] });
    agents.push(second);
    await second.listening();
    const expected = Buffer.from(b);
    const ops = [
      `write -P 0x11 ${3 * MiB + 4096} 8192`, // partial write into a remote region: RMW from B
      `write -z ${6 * MiB} ${MiB}`, // whole region zeroed without a fetch
      `write -z ${9 * MiB + 512} 1024`, // partial zeroing
      `discard ${12 * MiB} ${2 * MiB}`, // trimmed regions read as zeros or B, never A
      'flush',
    ];
    await run('qemu-io', ['-f', 'raw', nbdUri(sock), ...ops.flatMap((c) => ['-c', c])]);
    expected.fill(0x11, 3 * MiB + 4096, 3 * MiB + 4096 + 8192);
    expected.fill(0, 6 * MiB, 7 * MiB);
    expected.fill(0, 9 * MiB + 512, 9 * MiB + 1536);
    const check = async (label: string): Promise<void> => {
      const out = path.join(dir, `${label}.out`);
      await run('nbdcopy', [nbdUri(sock), out]);
      const got = fs.readFileSync(out);
      fs.rmSync(out);
      for (let off = 0; off < got.length; off += 4096) {
        const g = got.subarray(off, off + 4096);
        const inTrim = off >= 12 * MiB && off < 14 * MiB;
        const ok = g.equals(expected.subarray(off, off + 4096)) || (inTrim && g.every((x) => x === 0));
        if (!ok) {
          const fromA = g.equals(a.subarray(off, off + 4096));
          assert.fail(`${label}: block at ${off} ${fromA ? "holds the previous tenant's bytes" : 'holds unexpected bytes'}`);
        }
      }
    };
    await check('live');
    // A crash, then the same checks from what is on disk.
    await second.kill();
    const third = new AgentProcess({ source: originB.url, target, state: path.join(dir, 'state-b'), socket: sock, extra: ['--no-hydrate'] });
    agents.push(third);
    await third.listening();
    await check('after-crash');
    await third.stop();
    await originB.stop();
  });
});

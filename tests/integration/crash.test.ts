/**
 * kill -9 in the middle of hydration, with flushed writes: after a restart every flushed
 * write is there, every other byte is the image's, and hydration finishes to a target
 * that equals the image with the writes applied.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { AgentProcess, makeImage, nbdUri, tempDir } from '../helpers/agent.js';
import { TestOrigin } from '../helpers/origin.js';
import { run } from '../helpers/run.js';

const MiB = 1 << 20;

describe('crash (kill -9) during hydration', function () {
  this.timeout(120_000);
  let dir: string;
  let cleanup: () => void;
  let origin: TestOrigin;
  const agents: AgentProcess[] = [];

  before(async () => {
    ({ dir, cleanup } = tempDir('crash'));
    makeImage(path.join(dir, 'image.raw'), 40 * MiB, 3);
    origin = new TestOrigin({ file: path.join(dir, 'image.raw') });
    await origin.start();
  });
  after(async () => {
    for (const a of agents) await a.kill();
    await origin.stop();
    cleanup();
  });

  for (const trial of [1, 2, 3]) {
    it(`trial ${trial}: flushed writes survive, the rest is the image`, async () => {
      const sock = path.join(dir, `t${trial}.sock`);
      const target = path.join(dir, `t${trial}.target`);
      const state = path.join(dir, `t${trial}.state`);
      const args = { source: origin.url, target, state, socket: sock };
      // The origin holds back 28..36 MiB until the crash, so hydration is provably unfinished
      // when it comes; 1 MiB batches keep the held fetches clear of the regions written below.
      origin.hold(28 * MiB, 36 * MiB);
      const a = new AgentProcess({ ...args, extra: ['--bandwidth', '6M', '--batch-size', '1M', '--commit-interval', '200ms'] });
      agents.push(a);
      await a.listening();
      // Writes at offsets that differ per trial: partial regions, whole regions, straddling.
      const expected = fs.readFileSync(path.join(dir, 'image.raw'));
      const writes: { offset: number; length: number; pattern: number }[] = [
        { offset: trial * 100_000, length: 70_000, pattern: 0x10 + trial },
        { offset: (8 + trial) * MiB - 2048, length: 4096, pattern: 0x20 + trial },
        { offset: (20 + trial) * MiB, length: 2 * MiB, pattern: 0x30 + trial },
        { offset: 39 * MiB + 123, length: 1000, pattern: 0x40 + trial },
      ];
      await run('qemu-io', ['-f', 'raw', nbdUri(sock), ...writes.flatMap((w) => ['-c', `write -P ${w.pattern} ${w.offset} ${w.length}`]), '-c', 'flush']);
      for (const w of writes) expected.fill(w.pattern, w.offset, w.offset + w.length);
      // Let hydration run on a little, then crash mid-way, without any chance to commit.
      await a.waitFor((e) => e.event === 'progress' && (e['regionsLocal'] as number) >= 8 + trial * 2, 30_000);
      await a.kill();
      origin.release();
      const p = a.latestProgress()!;
      assert.ok((p['regionsLocal'] as number) <= (p['regionsTotal'] as number) - 8, 'crashed before hydration finished');

      const b = new AgentProcess({ ...args, extra: ['--no-hydrate'] });
      agents.push(b);
      await b.listening();
      const out = path.join(dir, `t${trial}.out`);
      await run('nbdcopy', [nbdUri(sock), out]);
      const got = fs.readFileSync(out);
      for (const w of writes) {
        assert.ok(got.subarray(w.offset, w.offset + w.length).every((x) => x === w.pattern), `flushed write at ${w.offset} survived`);
      }
      assert.ok(got.equals(expected), 'every other byte equals the image');
      await b.stop();

      const c = new AgentProcess({ ...args });
      agents.push(c);
      await c.complete(60_000);
      await c.stop();
      assert.ok(fs.readFileSync(target).equals(expected), 'target after hydration = image + flushed writes');
      fs.rmSync(out);
    });
  }
});

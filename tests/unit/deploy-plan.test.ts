/**
 * The deploy-modes bench's pure logic (bench/lib/deploy-plan.ts): the rotation of the mode
 * order per round, the default modes, the rate labels, and the goals of issue #14 from the
 * medians.
 */
import assert from 'node:assert/strict';
import { BootHung, bootAgainIfHung, defaultModes, type HungBoot, MODES, rateLabel, realOsGoals, roundOrder } from '../../bench/lib/deploy-plan.js';

describe('deploy-modes plan', () => {
  it('rotates the mode order by one per round, so every mode runs in every position', () => {
    const modes = ['streaming', 'copy-first', 'network-only', 'local'];
    assert.deepEqual(roundOrder(modes, 1), modes);
    assert.deepEqual(roundOrder(modes, 2), ['copy-first', 'network-only', 'local', 'streaming']);
    assert.deepEqual(roundOrder(modes, 5), modes);
    const firsts = [1, 2, 3, 4].map((r) => roundOrder(modes, r)[0]);
    assert.deepEqual([...firsts].sort(), [...modes].sort());
  });

  it('labels link rates in bits per second', () => {
    assert.equal(rateLabel(125e6), '1 Gbit/s');
    assert.equal(rateLabel(12.5e6), '100 Mbit/s');
    assert.equal(rateLabel(1.25e9), '10 Gbit/s');
  });

  it('runs streaming with a boot profile by default on the real OS, not on the busybox fixture', () => {
    assert.deepEqual(defaultModes('debian'), [...MODES]);
    assert.ok(defaultModes('debian').includes('streaming-profile'));
    assert.deepEqual(defaultModes('busybox'), ['streaming', 'copy-first', 'network-only', 'local']);
  });

  it('computes streaming ≤ network-only per rate, and leaves the profile goal unmeasured without its mode', () => {
    const g = realOsGoals([
      { link: '1gbit', bitsPerSecond: 1e9, toMarkerS: { streaming: 70, 'network-only': 72, local: 68, 'copy-first': 80 } },
      { link: '100mbit', bitsPerSecond: 1e8, toMarkerS: { streaming: 90, 'network-only': 80, local: 68 } },
    ]);
    assert.equal(g.streamingOverNetworkOnly.length, 2);
    assert.equal(g.streamingOverNetworkOnly[0]!.met, true);
    assert.ok(Math.abs(g.streamingOverNetworkOnly[0]!.ratio - 70 / 72) < 1e-12);
    assert.equal(g.streamingOverNetworkOnly[1]!.met, false);
    assert.equal(g.profileOverLocal, null);
  });

  it('computes the profile goal against local once the mode has run', () => {
    const g = realOsGoals([{ link: '1gbit', bitsPerSecond: 1e9, toMarkerS: { 'streaming-profile': 71, local: 68 } }]);
    assert.deepEqual(g.streamingOverNetworkOnly, []);
    assert.equal(g.profileOverLocal!.length, 1);
    assert.equal(g.profileOverLocal![0]!.met, 71 / 68 <= 1.05);
    assert.equal(g.profileOverLocal![0]!.goal, 1.05);
  });

  describe('a boot that hangs', () => {
    const hang = (run: HungBoot['run'], attempt: number): BootHung =>
      new BootHung({ run, link: '100 Mbit/s', mode: 'streaming', rep: 2, attempt, timeoutS: 240, guest: null, serialTail: `tail ${attempt}` });

    it('is booted once more, each hang kept and logged with its kind', async () => {
      const hung: HungBoot[] = [];
      const logs: string[] = [];
      const attempts: number[] = [];
      const r = await bootAgainIfHung(hung, (s) => logs.push(s), 'login prompt', async (attempt) => {
        attempts.push(attempt);
        if (attempt === 1) throw hang('working set', attempt);
        return 'booted';
      });
      assert.equal(r, 'booted');
      assert.deepEqual(attempts, [1, 2]);
      assert.deepEqual(hung.map((h) => [h.run, h.attempt]), [['working set', 1]]);
      assert.equal(logs.length, 1);
      assert.match(logs[0]!, /100 Mbit\/s working set 2 HUNG: no login prompt within 240 s .*booting it again.*tail 1/);
    });

    it('is given up on the second time, both hangs kept', async () => {
      const hung: HungBoot[] = [];
      await assert.rejects(
        bootAgainIfHung(hung, () => undefined, 'login prompt', async (attempt) => {
          throw hang('profile recording', attempt);
        }),
        /100 Mbit\/s profile recording: no marker within 240 s/,
      );
      assert.deepEqual(hung.map((h) => h.attempt), [1, 2]);
    });

    it('is the only failure booted again: any other error ends the run at once', async () => {
      const hung: HungBoot[] = [];
      let calls = 0;
      await assert.rejects(
        bootAgainIfHung(hung, () => undefined, 'login prompt', async () => {
          calls++;
          throw new Error('QEMU exited (1)');
        }),
        /QEMU exited/,
      );
      assert.equal(calls, 1);
      assert.deepEqual(hung, []);
    });

    it("names a round the way results older than the field did, with the image's size where there are several", () => {
      assert.match(hang(undefined, 1).message, /^100 Mbit\/s streaming round 2: /);
      assert.match(hang('round', 1).message, /^100 Mbit\/s streaming round 2: /);
      assert.match(new BootHung({ ...hang('round', 1).hung, size: '256 MiB' }).message, /^256 MiB 100 Mbit\/s streaming round 2: /);
    });
  });
});

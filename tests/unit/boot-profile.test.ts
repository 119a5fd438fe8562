/**
 * Boot profiles, the pure parts: the agent's recorder (first read of each image region, in
 * order; the window and the budget end it; suspended reads are not recorded) and the
 * driver's merge rule.
 */
import assert from 'node:assert/strict';
import { BootRecorder, type ReadRecorder, replayProblem } from '../../dpu-agent/src/streaming/boot-profile.js';
import { mergeBoots } from '../../driver/src/boot-profiles.js';

const R = 4096;

function recorder(over: Partial<ConstructorParameters<typeof BootRecorder>[0]> = {}): { rec: BootRecorder; disk: { recorder: ReadRecorder | null }; fire: () => void } {
  let fire: () => void = () => assert.fail('no window timer');
  const rec = new BootRecorder({
    regionSize: R,
    imageRegions: 100,
    windowMs: 1000,
    maxRegions: 50,
    schedule: (fn) => {
      fire = fn;
      return () => {
        fire = () => undefined;
      };
    },
    ...over,
  });
  const disk: { recorder: ReadRecorder | null } = { recorder: null };
  rec.attach(disk);
  return { rec, disk, fire: () => fire() };
}

describe('boot profile recorder', () => {
  it('records the first read of each image region in order, spanning reads, not past the image', () => {
    const { rec, disk } = recorder();
    assert.equal(rec.state, 'waiting');
    disk.recorder!.onRead(7 * R + 100, 10);
    disk.recorder!.onRead(2 * R, 3 * R); // 2, 3, 4
    disk.recorder!.onRead(3 * R, 1); // seen
    disk.recorder!.onRead(99 * R, 5 * R); // 99, then past the image
    disk.recorder!.onRead(150 * R, R); // past the image: nothing
    assert.equal(rec.state, 'recording');
    assert.deepEqual(rec.view().regions, [7, 2, 3, 4, 99]);
  });

  it('ends when the window after the first read passes, and detaches from the disk', () => {
    const { rec, disk, fire } = recorder();
    disk.recorder!.onRead(0, 1);
    fire();
    assert.equal(rec.state, 'done');
    assert.equal(rec.view().stop_reason, 'window');
    assert.equal(disk.recorder, null, 'reads cost one null check again');
  });

  it('ends when the budget is full', () => {
    const { rec, disk } = recorder({ maxRegions: 3 });
    let done = 0;
    rec.on('done', () => done++);
    disk.recorder!.onRead(0, 10 * R);
    assert.equal(rec.state, 'done');
    assert.equal(rec.view().stop_reason, 'budget');
    assert.deepEqual(rec.view().regions, [0, 1, 2]);
    assert.equal(done, 1);
  });

  it('does not record what runs unrecorded (the agent\'s own reads)', async () => {
    const { rec, disk } = recorder();
    await rec.unrecorded(async () => {
      assert.equal(disk.recorder, null);
      await rec.unrecorded(async () => undefined);
      assert.equal(disk.recorder, null, 'nested');
    });
    assert.equal(disk.recorder, rec);
    assert.equal(rec.state, 'waiting');
  });

  it('checks a profile to replay: region size, regions inside the image', () => {
    assert.equal(replayProblem({ region_size: R, regions: [0, 99] }, R, 100), null);
    assert.equal(replayProblem({ region_size: 2 * R, regions: [0] }, R, 100)?.field, 'boot_profile.replay.region_size');
    assert.match(replayProblem({ region_size: R, regions: [1, 100] }, R, 100)!.message, /region 100 \(entry 1\)/);
    assert.equal(replayProblem({ region_size: R, regions: [1, 100] }, R, null), null, 'the image size is not known before open');
  });
});

describe('boot profile merge', () => {
  const merge = (boots: number[][], minShare = 0.5, maxRegions = 100): number[] => mergeBoots(boots, { minShare, maxRegions });

  it('one boot is the profile', () => {
    assert.deepEqual(merge([[5, 1, 9]]), [5, 1, 9]);
    assert.deepEqual(merge([]), []);
  });

  it('orders by mean rank scaled to the boot\'s length, ties by boots then region', () => {
    // 1: ranks 0 and 0 → 0; 2: 1/2 and 1/4 → 3/8; 3: 1 (one boot); 4: 2/4 → 1/2 (one boot); 5: 1 and 3/4 → 7/8.
    assert.deepEqual(merge([[1, 2, 5], [1, 2, 4, 5, 3]]), [1, 2, 4, 5, 3]);
  });

  it('keeps regions read by at least min_share of the boots', () => {
    const boots = [
      [1, 2, 3],
      [1, 2, 4],
      [1, 5, 2],
    ];
    assert.deepEqual(merge(boots, 0.5), [1, 2]); // need 2 of 3
    assert.deepEqual(merge(boots, 0), [1, 5, 2, 3, 4]); // need 1: all, 5 ranks 1/2, 3 and 4 rank 1
    assert.deepEqual(merge(boots, 1), [1, 2]);
  });

  it('is bounded by max_regions, keeping the earliest', () => {
    assert.deepEqual(merge([[9, 8, 7, 6]], 0.5, 2), [9, 8]);
  });

  it('counts a region once per boot (its first read)', () => {
    assert.deepEqual(merge([[3, 1, 3]]), [3, 1]);
  });
});

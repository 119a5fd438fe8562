import assert from 'node:assert/strict';
import { concurrentTrial, trial } from '../torture/crash-torture.js';

describe('crash torture (power cut on a volatile-cache target)', function () {
  this.timeout(120_000);

  it('30 random trials: no flushed write lost, no wrong byte, map agrees with data', async () => {
    for (let seed = 1000; seed < 1030; seed++) await trial(seed);
  });

  it('60 concurrent trials: overlapping fetches, commits, origin faults, a manifest midway, a power cut mid-wave', async () => {
    let reads = 0;
    for (let seed = 2000; seed < 2060; seed++) reads += (await concurrentTrial(seed)).reads;
    assert.ok(reads > 300, `only ${reads} reads were checked`);
  });

  it('the concurrent harness catches a device that acknowledges flushes it did not perform', async () => {
    let caught = 0;
    for (let seed = 1; seed <= 20; seed++) {
      try {
        await concurrentTrial(seed, { lieAboutSync: true });
      } catch (err) {
        if (/sector \d+/.test((err as Error).message)) caught++;
        else throw err;
      }
    }
    assert.ok(caught >= 3, `only ${caught} of 20 trials with a lying device were caught`);
  });

  it('catches a device that acknowledges flushes it did not perform (the harness can fail)', async () => {
    let caught = 0;
    for (let seed = 1; seed <= 20; seed++) {
      try {
        await trial(seed, { lieAboutSync: true });
      } catch (err) {
        if (/sector \d+/.test((err as Error).message)) caught++;
        else throw err;
      }
    }
    assert.ok(caught >= 5, `only ${caught} of 20 trials with a lying device were caught`);
  });
});

/**
 * A small sample of the origin fault torture (tests/torture/origin-torture.ts) on every
 * CI run: about 300 faults of every kind and both kinds of outage, against the real
 * streaming disk. The 10 000-fault run is `node dist/tests/torture/origin-torture.js
 * --faults 10000` (docs/reliability.md).
 */
import assert from 'node:assert/strict';
import { FAULT_KINDS } from '../helpers/origin.js';
import { summary, torture } from '../torture/origin-torture.js';

describe('origin fault torture (sample)', function () {
  this.timeout(120_000);

  it('~300 random faults and outages: no wrong byte, EIO only past the deadline, counters agree, hydration completes', async () => {
    const t = await torture({ faults: 300, seed: 1, imageMiB: 4, parallel: 4 });
    console.log(summary(t, { seed: 1, imageMiB: 4 }).replace(/^/gm, '      '));
    assert.deepEqual(t.problems, []);
    assert.equal(t.wrongBytes, 0);
    assert.equal(t.unexpectedIoErrors, 0);
    assert.equal(t.counterMismatches, 0);
    assert.equal(t.hydrationsCompleted, t.trials);
    assert.ok(t.faults >= 300);
    for (const k of [...FAULT_KINDS, 'outage-short', 'outage-long'] as const) assert.ok((t.byKind[k] ?? 0) > 0, `no ${k} fault injected`);
    assert.ok(t.expectedIoErrors > 0, 'a long outage failed some read (the harness can see an EIO)');
  });
});

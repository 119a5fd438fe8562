/**
 * The Ironic plugin's own Python unit tests (driver/ironic/smartnic_ironic/tests), run on
 * Debian's /usr/bin/python3 — the interpreter Ironic itself runs on.
 */
import assert from 'node:assert/strict';
import { fileURLToPath } from 'node:url';
import { run } from '../helpers/run.js';

describe('Ironic plugin (Python unit tests)', function () {
  this.timeout(120_000);
  it('passes python3 -m unittest', async () => {
    const dir = fileURLToPath(new URL('../../../driver/ironic/', import.meta.url));
    const res = await run('/usr/bin/python3', ['-m', 'unittest', 'discover', '-s', dir, '-t', dir], { allowFail: true });
    assert.equal(res.code, 0, res.stderr.slice(-4000));
    assert.match(res.stderr, /Ran \d+ tests/);
  });
});

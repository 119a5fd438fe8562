import assert from 'node:assert/strict';
import fs from 'node:fs';
import { fileURLToPath } from 'node:url';
import { streamHelp } from '../../dpu-agent/src/cli/stream.js';
import { parseDuration, parseRate, parseSize } from '../../dpu-agent/src/cli/units.js';

describe('CLI reference and units', () => {
  it('docs/dpu-agent.md carries the current --help text', () => {
    const doc = fs.readFileSync(fileURLToPath(new URL('../../../docs/dpu-agent.md', import.meta.url)), 'utf8');
    assert.ok(doc.includes(streamHelp()), 'regenerate the reference: node dpu-agent/bin/dpu-agent.js stream --help');
  });

  it('parses sizes, rates and durations as documented', () => {
    assert.equal(parseSize('1M', 'x'), 1 << 20);
    assert.equal(parseSize('64KiB', 'x'), 64 << 10);
    assert.equal(parseRate('1gbit', 'x'), 125_000_000);
    assert.equal(parseRate('50M/s', 'x'), 50 << 20);
    assert.equal(parseDuration('1.5s', 'x'), 1500);
    assert.throws(() => parseSize('lots', '--batch-size'), /--batch-size "lots" is not a size/);
  });
});

describe('manifest command reference', () => {
  it('docs/dpu-agent.md carries the current dpu-agent manifest --help text', async () => {
    const { manifestHelp } = await import('../../dpu-agent/src/cli/manifest.js');
    const doc = fs.readFileSync(fileURLToPath(new URL('../../../docs/dpu-agent.md', import.meta.url)), 'utf8');
    assert.ok(doc.includes(manifestHelp()), 'regenerate: node dpu-agent/bin/dpu-agent.js manifest --help');
  });
});

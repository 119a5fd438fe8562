import assert from 'node:assert/strict';
import fs from 'node:fs';
import { fileURLToPath } from 'node:url';
import { DRIVER_ERRORS } from '../../driver/src/errors.js';

describe('driver error registry', () => {
  const doc = fs.readFileSync(fileURLToPath(new URL('../../../docs/errors.md', import.meta.url)), 'utf8');

  it('documents every DRV_ERR code with its HTTP status, and nothing else', () => {
    for (const [code, spec] of Object.entries(DRIVER_ERRORS)) {
      const row = doc.split('\n').find((l) => l.startsWith(`| \`${code}\` |`));
      assert.ok(row, `${code} is documented`);
      assert.equal(row.split('|')[2]!.trim(), String(spec.http), `${code} HTTP status`);
    }
    for (const m of doc.matchAll(/\| `(DRV_ERR_[A-Z_]+)` \|/g)) assert.ok(m[1]! in DRIVER_ERRORS, `${m[1]} exists`);
  });
});

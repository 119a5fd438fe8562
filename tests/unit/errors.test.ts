import assert from 'node:assert/strict';
import fs from 'node:fs';
import { fileURLToPath } from 'node:url';
import { DpuError, ERRORS, NbdErrno, toNbdErrno } from '../../image-access/src/errors.js';

describe('error registry', () => {
  const doc = fs.readFileSync(fileURLToPath(new URL('../../../docs/errors.md', import.meta.url)), 'utf8');

  it('documents every code in docs/errors.md, and no code that does not exist', () => {
    for (const code of Object.keys(ERRORS)) assert.match(doc, new RegExp(`\\| \`${code}\` \\|`), `${code} is documented`);
    const documented = [...doc.matchAll(/\| `(DPU_ERR_[A-Z_]+)` \|/g)].map((m) => m[1]);
    for (const code of documented) assert.ok(code! in ERRORS, `${code} in the docs exists in the registry`);
  });

  it('documents the retry policy the registry states', () => {
    for (const [code, spec] of Object.entries(ERRORS)) {
      const row = doc.split('\n').find((l) => l.startsWith(`| \`${code}\``))!;
      const retried = row.split('|')[3]!.trim();
      assert.equal(retried, spec.retryable ? 'yes' : 'no', `${code} retried column`);
    }
  });

  it('maps errors to NBD errnos', () => {
    assert.equal(toNbdErrno(new DpuError('DPU_ERR_READ_ONLY')), NbdErrno.EPERM);
    assert.equal(toNbdErrno(Object.assign(new Error('x'), { code: 'ENOSPC' })), NbdErrno.ENOSPC);
    assert.equal(toNbdErrno(new Error('anything else')), NbdErrno.EIO);
  });
});

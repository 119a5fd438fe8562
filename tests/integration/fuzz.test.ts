/**
 * A sample of the fuzzers on every CI run (the long runs are in docs/reliability.md): NBD
 * handshake and transmission inputs against the real server, and malformed and
 * valid-shaped requests against both REST APIs. The seed is random per run and printed
 * on failure, so a failure replays with `node dist/tests/fuzz/fuzz.js --seed S`.
 */
import assert from 'node:assert/strict';
import { runApiFuzz } from '../fuzz/api-fuzz.js';
import { type FuzzReport, printReport, runNbdFuzz } from '../fuzz/nbd-fuzz.js';

const seed = process.env['FUZZ_SEED'] ? Number(process.env['FUZZ_SEED']) : Math.floor(Math.random() * 2 ** 31);

function verdict(r: FuzzReport, min: number): void {
  const lines: string[] = [];
  printReport(r, (l) => lines.push(l));
  assert.equal(r.failures.length, 0, `${lines.join('\n')}\nreplay: FUZZ_SEED=${seed} or node dist/tests/fuzz/fuzz.js --${r.name} ${r.inputs} --${r.name === 'nbd' ? 'api' : 'nbd'} 0 --seed ${seed}`);
  assert.ok(r.inputs >= min, `only ${r.inputs} inputs ran`);
}

describe(`fuzzing sample (seed ${seed})`, function () {
  this.timeout(120_000);

  it('NBD: 3000 handshake and transmission inputs; no crash, no hang, well-formed replies, data changed only by acknowledged writes', async () => {
    verdict(await runNbdFuzz({ inputs: 3000, seed }), 3000);
  });

  it('REST APIs: 2000 requests from the OpenAPI documents; no 5xx for malformed input, Error bodies that name the problem', async () => {
    verdict(await runApiFuzz({ inputs: 2000, seed }), 2000);
  });
});

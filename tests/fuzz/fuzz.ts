/**
 * The fuzzing CLI (issue #8): the NBD handshake and transmission parser (nbd-fuzz.ts) and
 * the two REST APIs against their OpenAPI documents (api-fuzz.ts), then a summary. Exits 1
 * when any property failed, with the seed and the (shrunk) counterexample to replay it.
 *
 *   node dist/tests/fuzz/fuzz.js [--nbd N] [--api N] [--seed S]
 *
 * --nbd / --api: inputs for each (default 10000; 0 skips it). --seed: replays a run
 * (default: random, printed). Long runs belong outside CI: see docs/reliability.md.
 */
import { parseArgs } from 'node:util';
import { runApiFuzz } from './api-fuzz.js';
import { type FuzzReport, printReport, runNbdFuzz } from './nbd-fuzz.js';

const HELP = `usage: node dist/tests/fuzz/fuzz.js [--nbd N] [--api N] [--seed S] [--workers W]

  --nbd N       NBD inputs: handshake sessions and transmission batches (default 10000; 0 skips)
  --api N       REST API requests, both services (default 10000; 0 skips)
  --seed S      replay a run (default: random, printed in the summary)
  --workers W   concurrent NBD clients (default 6) and API requests in flight (default 16)
`;

const { values } = parseArgs({
  options: { nbd: { type: 'string', default: '10000' }, api: { type: 'string', default: '10000' }, seed: { type: 'string' }, workers: { type: 'string' }, help: { type: 'boolean', short: 'h' } },
});
if (values.help) {
  process.stdout.write(HELP);
  process.exit(0);
}
const count = (name: string, v: string): number => {
  const n = Number(v);
  if (!Number.isInteger(n) || n < 0) {
    process.stderr.write(`fuzz: --${name} must be a whole number, not "${v}"\n${HELP}`);
    process.exit(2);
  }
  return n;
};
const nbd = count('nbd', values.nbd);
const api = count('api', values.api);
const seed = values.seed !== undefined ? count('seed', values.seed) : Math.floor(Math.random() * 2 ** 31);
const workers = values.workers !== undefined ? count('workers', values.workers) : undefined;
const log = (l: string): void => console.log(l);

const reports: FuzzReport[] = [];
if (nbd > 0) reports.push(await runNbdFuzz({ inputs: nbd, seed, log, ...(workers ? { workers } : {}) }));
if (api > 0) reports.push(await runApiFuzz({ inputs: api, seed, log, ...(workers ? { concurrency: workers } : {}) }));
console.log('summary');
for (const r of reports) printReport(r);
const failed = reports.reduce((n, r) => n + r.failures.length, 0);
console.log(failed ? `FAILED: ${failed} failure(s); replay with --seed ${seed}` : `ok: no failure; seed ${seed}`);
process.exit(failed ? 1 : 0);

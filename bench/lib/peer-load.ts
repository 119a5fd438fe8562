/**
 * A load of peer reads, as peer agents send them (GET /v1/disks/{id}/image with one Range
 * and the image's peer token), for bench/peer-serve.ts: `concurrency` loops, each asking
 * for `rangeBytes` at a random region-aligned offset and reading the whole answer, as fast
 * as the agent answers. A child process of its own, so the bench can pin it to a core.
 *
 *   node dist/bench/lib/peer-load.js URL DISK TOKEN IMAGE_BYTES RANGE_BYTES CONCURRENCY
 *
 * Prints `{"event":"flowing"}` once the first answer is in; on SIGUSR2 its counts so far,
 * `{"bytes":…,"answers":…,"busy":…,"refused":…,"seconds":…}` (bytes of whole 206 answers,
 * the 503s and other refusals, seconds since it started); on SIGTERM the same, then it
 * exits 0.
 */
import http from 'node:http';
import https from 'node:https';

const [url, disk, token, imageArg, rangeArg, concArg] = process.argv.slice(2);
if (!url || !disk || !token || !imageArg || !rangeArg || !concArg) {
  console.error('usage: peer-load URL DISK TOKEN IMAGE_BYTES RANGE_BYTES CONCURRENCY');
  process.exit(2);
}
const imageBytes = Number(imageArg);
const rangeBytes = Number(rangeArg);
const concurrency = Number(concArg);
const slots = Math.floor(imageBytes / rangeBytes);
const target = new URL(`${url.replace(/\/+$/, '')}/v1/disks/${encodeURIComponent(disk)}/image`);
const lib = target.protocol === 'https:' ? https : http;
const agent = new lib.Agent({ keepAlive: true, maxSockets: concurrency });
const counts = { bytes: 0, answers: 0, busy: 0, refused: 0 };
let flowing = false;
let stopping = false;
const started = performance.now();

function once(): Promise<void> {
  const at = Math.floor(Math.random() * slots) * rangeBytes;
  return new Promise((resolve, reject) => {
    const req = lib.get(target, { agent, headers: { authorization: `Bearer ${token}`, range: `bytes=${at}-${at + rangeBytes - 1}` } }, (res) => {
      let n = 0;
      res.on('data', (d: Buffer) => (n += d.length));
      res.on('end', () => {
        if (res.statusCode === 206) {
          counts.bytes += n;
          counts.answers++;
          if (!flowing) {
            flowing = true;
            process.stdout.write('{"event":"flowing"}\n');
          }
        } else if (res.statusCode === 503) counts.busy++;
        else counts.refused++;
        resolve();
      });
      res.on('error', reject);
    });
    req.on('error', reject);
  });
}

async function loop(): Promise<void> {
  while (!stopping) {
    try {
      await once();
    } catch (err) {
      if (!stopping) {
        console.error(`peer-load: ${(err as Error).message}`);
        process.exit(1);
      }
    }
  }
}

const snapshot = (): string => JSON.stringify({ ...counts, seconds: (performance.now() - started) / 1000 }) + '\n';
process.on('SIGUSR2', () => process.stdout.write(snapshot()));
process.on('SIGTERM', () => {
  stopping = true;
  process.stdout.write(snapshot(), () => process.exit(0));
});
for (let i = 0; i < concurrency; i++) void loop();

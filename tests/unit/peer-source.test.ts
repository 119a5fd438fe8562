/**
 * The peer source's gate (dpu-agent/src/streaming/peer-source.ts): what a disk that is not
 * its image's seeder may copy now. The peers are a small HTTP server answering the
 * documented GET …/image/regions contract with maps the test sets (a controllable peer,
 * named as such; the agent's own endpoint is tested in tests/integration).
 */
import assert from 'node:assert/strict';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { encodeRuns, PeerFirstSource } from '../../dpu-agent/src/streaming/peer-source.js';
import { MemorySource } from '../helpers/memory-source.js';

const R = 1 << 20;
const REGIONS = 8;


async function until(cond: () => boolean): Promise<void> {
  while (!cond()) await new Promise((r) => setTimeout(r, 10));
}

describe('peer source: waiting for peers instead of reading the origin', function () {
  const maps: Record<string, number[]> = {};
  let server: http.Server;
  let url: string;
  let src: PeerFirstSource;
  const reads = { maps: 0 };

  before(async () => {
    server = http.createServer((req, res) => {
      const m = /^\/v1\/disks\/([^/]+)\/image\/regions$/.exec(req.url ?? '');
      if (!m || req.headers.authorization !== 'Bearer token-of-the-image-0123') return void res.writeHead(401).end();
      reads.maps++;
      res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ region_size: R, regions: REGIONS, runs: encodeRuns(maps[m[1]!] ?? []) }));
    });
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  });
  after(async () => {
    await src?.close();
    await new Promise((r) => server.close(r));
  });

  it('admits runs one peer has; holds the rest while peers grow; opens once they stop growing for origin_wait_ms', async () => {
    maps['a'] = [1, 1, 1, 1, 0, 0, 0, 0];
    maps['b'] = [0, 0, 0, 0, 1, 1, 1, 0];
    src = new PeerFirstSource(new MemorySource(Buffer.alloc(REGIONS * R, 7)), R);
    src.verifiedBy(() => true);
    src.setPeers([{ url, disk: 'a' }, { url, disk: 'b' }], 'token-of-the-image-0123', 60_000);
    const t0 = Date.now();
    await until(() => src.admissible(t0)?.[5] === 1);
    assert.deepEqual([...src.admissible(t0)!], [1, 1, 1, 1, 1, 1, 1, 0], 'the union of the maps');
    // A run that spans two peers is cut where the first peer's part ends: read() asks one peer.
    assert.equal(src.admit(0, 8, t0), 4);
    assert.equal(src.admit(4, 4, t0), 3);
    assert.equal(src.admit(7, 1, t0), 0, 'no peer has it: wait');
    // Peers not growing for origin_wait_ms (a dead seeder): the gate opens, the origin is read.
    const later = Date.now() + 60_001;
    assert.equal(src.admissible(later), null);
    assert.equal(src.admit(7, 1, later), 1);
    // They grow again: the stall clock starts over.
    maps['b'] = [0, 0, 0, 0, 1, 1, 1, 1];
    const seen = reads.maps;
    await until(() => reads.maps >= seen + 4 && src.admissible()?.[7] === 1);
    assert.notEqual(src.admissible(Date.now() + 1000), null);
  });

  it('no gate for a seeder (origin_wait_ms 0) or without a manifest; a non-seeder with no peer yet waits', async () => {
    const s = new PeerFirstSource(new MemorySource(Buffer.alloc(REGIONS * R)), R);
    let manifest = false;
    s.verifiedBy(() => manifest);
    s.setPeers([], 'token-of-the-image-0123', 0);
    manifest = true;
    assert.equal(s.admissible(), null, 'a seeder');
    s.setPeers([], 'token-of-the-image-0123', 30_000);
    assert.deepEqual([...s.admissible()!], new Array(REGIONS).fill(0), 'told it is not a seeder: waits for one');
    manifest = false;
    assert.equal(s.admissible(), null, 'peers are never used without a manifest');
    await s.close();
  });
});

/**
 * The peer source's gate (dpu-agent/src/streaming/peer-source.ts): what a disk that is not
 * its image's seeder may copy now. The peers are a small HTTP server answering the
 * documented GET …/image/regions contract with maps the test sets (a controllable peer,
 * named as such; the agent's own endpoint is tested in tests/integration). It answers
 * maps chunked (no Content-Length), as a proxy in between may.
 */
import assert from 'node:assert/strict';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { encodeRuns, PeerFirstSource } from '../../dpu-agent/src/streaming/peer-source.js';
import type { DpuError } from '../../image-access/src/errors.js';
import { HttpSource } from '../../image-access/src/http-source.js';
import { MemorySource } from '../helpers/memory-source.js';
import { TestOrigin } from '../helpers/origin.js';

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
    // A run that spans two peers is cut where the first peer's part ends: read() asks one
    // peer; and at 2 MiB, so that no answer holds a peer's upload long.
    assert.equal(src.admit(0, 8, t0), 2);
    assert.equal(src.admit(2, 8, t0), 2);
    assert.equal(src.admit(3, 8, t0), 1, 'where a\'s part ends');
    assert.equal(src.admit(4, 4, t0), 2);
    assert.equal(src.admit(6, 2, t0), 1);
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

describe('peer source: reading peers\' maps and asking peers', function () {
  const image = Buffer.alloc(REGIONS * R);
  for (let i = 0; i < image.length; i += 4096) image[i] = (i / R) | 1;
  /** Per disk of the controllable peer: its map, whether it says it is complete, and what was asked of it. */
  const peers: Record<string, { map: number[]; complete: boolean; mapReads: number; regionReads: number; refused: number; unavailable?: string }> = {};
  let server: http.Server;
  let url: string;
  const sources: PeerFirstSource[] = [];

  before(async () => {
    server = http.createServer((req, res) => {
      if (req.headers.authorization !== 'Bearer token-of-the-image-0123') return void res.writeHead(401).end();
      const m = /^\/v1\/disks\/([^/]+)\/image(\/regions)?$/.exec(req.url ?? '');
      const p = m ? peers[m[1]!] : undefined;
      if (!p) return void res.writeHead(404).end();
      if (m![2]) {
        p.mapReads++;
        return void res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ region_size: R, regions: REGIONS, runs: encodeRuns(p.map), complete: p.complete }));
      }
      p.regionReads++;
      if (p.unavailable) return void res.writeHead(503, { 'content-type': 'application/json' }).end(JSON.stringify({ code: p.unavailable, message: 'not now' }));
      const [a, b] = /^bytes=(\d+)-(\d+)$/.exec(req.headers.range ?? '')!.slice(1).map(Number) as [number, number];
      for (let r = Math.floor(a / R); r <= Math.floor(b / R); r++) {
        if (p.map[r] !== 1) {
          p.refused++;
          return void res.writeHead(409, { 'content-type': 'application/json' }).end('{"code":"DPU_ERR_NOT_SERVABLE"}');
        }
      }
      res.writeHead(206, { 'content-range': `bytes ${a}-${b}/${image.length}`, 'content-length': b - a + 1 }).end(image.subarray(a, b + 1));
    });
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  });
  after(async () => {
    for (const s of sources) await s.close();
    await new Promise((r) => server.close(r));
  });

  function source(originReads: number[]): PeerFirstSource {
    const origin = new MemorySource(image);
    const read = origin.read.bind(origin);
    origin.read = async (offset, dest, opts) => {
      originReads.push(offset / R);
      return read(offset, dest, opts);
    };
    const s = new PeerFirstSource(origin, R);
    s.verifiedBy(() => true);
    sources.push(s);
    return s;
  }

  it('reads a complete peer\'s map once, the others\' again and again; a refusal makes a complete peer\'s map read again', async () => {
    peers['seed'] = { map: new Array(REGIONS).fill(1), complete: true, mapReads: 0, regionReads: 0, refused: 0 };
    for (const d of ['p1', 'p2', 'p3']) peers[d] = { map: [1, 0, 0, 0, 0, 0, 0, 0], complete: false, mapReads: 0, regionReads: 0, refused: 0 };
    const s = source([]);
    s.setPeers(['seed', 'p1', 'p2', 'p3'].map((disk) => ({ url, disk })), 'token-of-the-image-0123', 0);
    await until(() => ['p1', 'p2', 'p3'].every((d) => peers[d]!.mapReads >= 3));
    assert.equal(peers['seed']!.mapReads, 1, 'a complete map can only shrink: read once');
    // The seed's host wrote region 5: it refuses it, and its map is read again.
    peers['seed']!.map[5] = 0;
    peers['seed']!.complete = false;
    const dest = Buffer.alloc(R);
    await s.read(5 * R, dest, { priority: 'background' });
    assert.equal(peers['seed']!.refused, 1);
    assert.ok(dest.equals(image.subarray(5 * R, 6 * R)), 'from the origin');
    assert.deepEqual(s.peerStats().fallbackRefused, 1);
    await until(() => peers['seed']!.mapReads >= 2);
  });

  it('a complete peer keeps the gate closed however long the union stands still; once it refuses a read, the stall clock decides again', async () => {
    peers['fullseed'] = { map: new Array(REGIONS).fill(1), complete: true, mapReads: 0, regionReads: 0, refused: 0 };
    const originReads: number[] = [];
    const s = source(originReads);
    s.setPeers([{ url, disk: 'fullseed' }], 'token-of-the-image-0123', 30_000);
    await until(() => s.admissible()?.[0] === 1);
    const later = Date.now() + 60_000;
    assert.notEqual(s.admissible(later), null, 'the seed has every region: waiting on it is not a stall');
    // Its host wrote region 6 (no longer served): a read of it is refused, its map dropped
    // (and read again: no longer complete).
    peers['fullseed']!.map[6] = 0;
    peers['fullseed']!.complete = false;
    await assert.rejects(s.read(6 * R, Buffer.alloc(R), { priority: 'background' }), (err: DpuError) => err.code === 'DPU_ERR_BUSY');
    assert.equal(peers['fullseed']!.refused, 1);
    assert.deepEqual(originReads, [], 'left for later while the gate holds, not read from the origin');
    assert.equal(s.admissible(later), null, 'no complete peer left: 30 s without growth opens the gate');
  });

  it('a disk waiting for peers leaves regions whose peers stay busy for later, not to the origin; a peer whose target failed is not asked again until its map shows regions', async () => {
    peers['busyseed'] = { map: new Array(REGIONS).fill(1), complete: false, mapReads: 0, regionReads: 0, refused: 0, unavailable: 'DPU_ERR_BUSY' };
    const originReads: number[] = [];
    const s = source(originReads);
    s.setPeers([{ url, disk: 'busyseed' }], 'token-of-the-image-0123', 60_000);
    await until(() => s.admissible()?.[3] === 1);
    await assert.rejects(s.read(3 * R, Buffer.alloc(R), { priority: 'background' }), (err: DpuError) => err.code === 'DPU_ERR_BUSY');
    assert.deepEqual(originReads, [], 'not the origin');
    assert.ok(peers['busyseed']!.regionReads > 1, 'asked again first');
    assert.equal(s.peerStats().deferrals, 1);
    assert.equal(s.peerStats().fallbacks, 0);
    assert.equal(s.admit(3, 2), 0, 'passed over for now');
    assert.equal(s.admit(4, 2), 2, 'the others are not');
    // 503 with another code (its SSD failed, it shuts down): not busy — its map is dropped
    // and read again (it serves nothing now), and the region is left for later.
    peers['busyseed']!.unavailable = 'DPU_ERR_TARGET_FAILED';
    peers['busyseed']!.map.fill(0); // a failed disk serves nothing (its map says so)
    peers['busyseed']!.regionReads = 0;
    const maps = peers['busyseed']!.mapReads;
    await assert.rejects(s.read(5 * R, Buffer.alloc(R), { priority: 'background' }), (err: DpuError) => err.code === 'DPU_ERR_BUSY' && /the last: failed/.test(err.message));
    assert.equal(peers['busyseed']!.regionReads, 1, 'asked once, not again and again');
    assert.ok(peers['busyseed']!.mapReads > maps, 'its map read again');
    assert.deepEqual(originReads, []);
    assert.equal(s.peerStats().deferrals, 2);
  });

  it('a peer request waits while the host\'s read is in flight on the origin, as the origin\'s background requests do', async () => {
    peers['hostfirst'] = { map: new Array(REGIONS).fill(1), complete: true, mapReads: 0, regionReads: 0, refused: 0 };
    const file = path.join(os.tmpdir(), `peer-source-${process.pid}.raw`);
    fs.writeFileSync(file, image);
    const origin = new TestOrigin({ file });
    const http = await HttpSource.open({ url: await origin.start() });
    try {
      const s = new PeerFirstSource(http, R);
      s.verifiedBy(() => true);
      sources.push(s);
      s.setPeers([{ url, disk: 'hostfirst' }], 'token-of-the-image-0123', 60_000);
      await until(() => s.admissible()?.[0] === 1);
      // The host's read (a miss) is held at the origin: in flight until released.
      origin.hold(7 * R, 8 * R);
      const miss = http.read(7 * R, Buffer.alloc(4096), { priority: 'foreground' });
      await until(() => http.stats().foregroundInflight === 1);
      const dest = Buffer.alloc(R);
      const background = s.read(2 * R, dest, { priority: 'background' });
      await until(() => s.peerStats().hostYields > 0);
      assert.equal(peers['hostfirst']!.regionReads, 0, 'the peer is not asked while the host reads');
      origin.release();
      await miss;
      await background;
      assert.equal(peers['hostfirst']!.regionReads, 1, 'then it is');
      assert.ok(dest.equals(image.subarray(2 * R, 3 * R)));
    } finally {
      await origin.stop();
      fs.rmSync(file, { force: true });
    }
  });

  it('a disk sparing the origin asks no peer whose map does not show the regions; it waits for maps still to be read, then leaves the regions for later', async () => {
    peers['holder'] = { map: [1, 1, 0, 0, 0, 0, 0, 0], complete: false, mapReads: 0, regionReads: 0, refused: 0 };
    peers['nomap'] = { map: new Array(REGIONS).fill(1), complete: false, mapReads: 0, regionReads: 0, refused: 0 };
    const originReads: number[] = [];
    const s = source(originReads);
    // 'gone' has no map to read (404): its map stays unknown, and it is never asked blind.
    s.setPeers([{ url, disk: 'holder' }, { url, disk: 'gone' }], 'token-of-the-image-0123', 60_000);
    await until(() => s.admissible()?.[1] === 1);
    const dest = Buffer.alloc(2 * R);
    await s.read(0, dest, { priority: 'background' });
    assert.ok(dest.equals(image.subarray(0, 2 * R)));
    assert.equal(peers['holder']!.regionReads, 1);
    // Region 4: nobody's map has it. The peer without a map is not asked; after the waits
    // for its map the region is left for later (the gate holds: the origin is spared).
    await assert.rejects(s.read(4 * R, dest.subarray(0, R), { priority: 'background' }), (err: DpuError) => err.code === 'DPU_ERR_BUSY');
    assert.deepEqual(originReads, []);
    assert.equal(peers['holder']!.regionReads, 1, 'the holder of other regions is not asked');
    assert.equal(peers['nomap']!.regionReads, 0);
    // A seeder (no wait) asks peers before the origin, even one whose map is not read yet.
    const seeder = source([]);
    seeder.setPeers([{ url, disk: 'nomap' }], 'token-of-the-image-0123', 0);
    await seeder.read(6 * R, dest.subarray(0, R), { priority: 'background' });
    assert.equal(peers['nomap']!.regionReads, 1);
  });
});

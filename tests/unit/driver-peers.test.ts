/** The tracker's choice of peers for one disk (driver/src/peers.ts choosePeers). */
import assert from 'node:assert/strict';
import { choosePeers, type PeerHolder, peerListDigest } from '../../driver/src/peers.js';

const holder = (n: number, over: Partial<PeerHolder> = {}): PeerHolder => ({
  deployment: `node-${n}/d`,
  url: `http://10.0.0.${n}:9611`,
  disk: `node-${n}-d`,
  rack: null,
  local: 0,
  total: 100,
  complete: false,
  until: Number.MAX_SAFE_INTEGER,
  ...over,
});
const self = { deployment: 'node-0/d', url: 'http://10.0.0.100:9611', disk: 'node-0-d', rack: 'r1' };

describe('peer tracker: which peers a disk is told', function () {
  it('same rack first, then complete disks, then by quarters of the image local', () => {
    const list = choosePeers(
      [
        holder(1, { local: 90 }), // other rack, 90%
        holder(2, { complete: true, local: 100 }), // other rack, complete
        holder(3, { rack: 'r1', local: 10 }), // same rack, 10%
        holder(4, { rack: 'r1', complete: true, local: 100 }), // same rack, complete
        holder(5, { local: 30 }), // other rack, 30%
      ],
      self,
      8,
    );
    assert.deepEqual(
      list.map((p) => p.disk),
      ['node-4-d', 'node-3-d', 'node-2-d', 'node-1-d', 'node-5-d'],
    );
  });

  it('leaves out the disk itself, URLs with a path, and duplicates; lists holders with nothing local last; caps the list', () => {
    const list = choosePeers(
      [
        holder(0, { ...self, local: 50 }), // itself (same deployment)
        holder(6, { url: self.url, disk: self.disk, deployment: 'other/x', local: 50 }), // its own disk under another name
        holder(1, { local: 0 }),
        holder(2, { url: 'http://10.0.0.2:9611/agent', local: 50 }),
        holder(3, { local: 50 }),
        holder(4, { url: 'http://10.0.0.3:9611/', disk: 'node-3-d', deployment: 'dup/x', local: 50 }),
        holder(5, { local: 60 }),
        holder(7, { local: 70 }),
      ],
      self,
      2,
    );
    assert.equal(list.length, 2);
    for (const p of list) {
      assert.ok(['node-3-d', 'node-5-d', 'node-7-d'].includes(p.disk), p.disk);
      assert.ok(!p.url.endsWith('/'), 'URLs without a trailing slash');
    }
    assert.equal(new Set(list.map((p) => `${p.url} ${p.disk}`)).size, 2);
    // A holder with nothing local yet is listed (agents read what it has from its map), after the others.
    assert.deepEqual(
      choosePeers([holder(1, { local: 0 }), holder(2, { local: 60 })], self, 8).map((p) => p.disk),
      ['node-2-d', 'node-1-d'],
    );
  });

  it('spreads a fleet starting together over equally good peers instead of naming one first everywhere', () => {
    const holders = Array.from({ length: 8 }, (_, i) => holder(i + 1, { complete: true, local: 100 }));
    const firsts = new Set<string>();
    for (let n = 0; n < 32; n++) firsts.add(choosePeers(holders, { ...self, deployment: `leech-${n}/d` }, 8)[0]!.disk);
    assert.ok(firsts.size >= 4, `first choices over 32 disks: ${[...firsts].join(', ')}`);
    // The same disk is told the same list each time (no churn between polls).
    assert.deepEqual(choosePeers(holders, self, 8), choosePeers([...holders].reverse(), self, 8));
  });

  it('a list digest changes with the list and only with it', () => {
    const a = [{ url: 'http://a:1', disk: 'x' }];
    assert.equal(peerListDigest(a), peerListDigest([{ url: 'http://a:1', disk: 'x' }]));
    assert.notEqual(peerListDigest(a), peerListDigest([{ url: 'http://a:1', disk: 'y' }]));
    assert.notEqual(peerListDigest(a), peerListDigest([]));
  });
});

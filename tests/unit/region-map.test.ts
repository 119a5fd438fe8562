import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { DpuError } from '../../image-access/src/errors.js';
import { RegionMap, RegionState } from '../../dpu-agent/src/region/region-map.js';
import { tempDir } from '../helpers/agent.js';

const MiB = 1 << 20;
const geo = { diskSize: 10 * MiB + 4096, regionSize: MiB, identity: 'http;size=x;etag="a"' };

describe('RegionMap', () => {
  let dir: string;
  let cleanup: () => void;
  beforeEach(() => ({ dir, cleanup } = tempDir('rmap')));
  afterEach(() => cleanup());

  it('starts all remote, with a short last region', () => {
    const m = RegionMap.open(dir, geo);
    assert.equal(m.count, 11);
    assert.equal(m.regionLength(10), 4096);
    assert.equal(m.describe(), 'r'.repeat(11));
    assert.equal(m.dirty, false);
    m.close();
  });

  it('persists local and zero, never filling, across reopen', async () => {
    const m = RegionMap.open(dir, geo);
    m.set(0, RegionState.Local);
    m.set(3, RegionState.Zero);
    m.set(5, RegionState.Filling);
    m.set(10, RegionState.Local);
    assert.equal(m.dirty, true);
    await m.persist(m.snapshot());
    assert.equal(m.dirty, false);
    m.close();
    const again = RegionMap.open(dir, geo);
    assert.equal(again.describe(), 'LrrzrrrrrrL');
    assert.equal(again.local, 2);
    assert.equal(again.zero, 1);
    again.close();
  });

  it('a filling region that lands changes what a commit must persist', () => {
    const m = RegionMap.open(dir, geo);
    m.set(2, RegionState.Filling);
    assert.equal(m.dirty, false, 'remote → filling persists the same bits');
    m.set(2, RegionState.Local);
    assert.equal(m.dirty, true);
    m.close();
  });

  it('survives a torn write of the newer slot by falling back to the older one', async () => {
    const m = RegionMap.open(dir, geo);
    m.set(1, RegionState.Local);
    await m.persist(m.snapshot()); // seq 2 → slot 0
    m.set(2, RegionState.Local);
    await m.persist(m.snapshot()); // seq 3 → slot 1
    m.close();
    // Damage slot 1 (the newest) as a torn write would.
    const file = path.join(dir, 'regions.map');
    const bytes = fs.readFileSync(file);
    bytes[4096 + 100] = bytes[4096 + 100]! ^ 0xff;
    fs.writeFileSync(file, bytes);
    const again = RegionMap.open(dir, geo);
    assert.equal(again.describe(), 'rLrrrrrrrrr');
    again.close();
  });

  it('refuses a map made for another image, naming what to do', () => {
    RegionMap.open(dir, geo).close();
    assert.throws(
      () => RegionMap.open(dir, { ...geo, identity: 'http;size=x;etag="b"' }),
      (e: unknown) => e instanceof DpuError && e.code === 'DPU_ERR_SOURCE_MISMATCH' && /new --state/.test(e.message),
    );
  });

  it('refuses another region size', () => {
    RegionMap.open(dir, geo).close();
    assert.throws(() => RegionMap.open(dir, { ...geo, regionSize: 2 * MiB }), (e: unknown) => e instanceof DpuError && e.code === 'DPU_ERR_CONFIG');
  });

  it('reports a map with both slots damaged as corrupt', () => {
    RegionMap.open(dir, geo).close();
    fs.writeFileSync(path.join(dir, 'regions.map'), Buffer.alloc(8192, 7));
    assert.throws(() => RegionMap.open(dir, geo), (e: unknown) => e instanceof DpuError && e.code === 'DPU_ERR_STATE_CORRUPT');
  });

  it('rejects region sizes that are not powers of two', () => {
    assert.throws(() => RegionMap.open(dir, { ...geo, regionSize: 3 * MiB }), /power of two/);
    assert.throws(() => RegionMap.open(dir, { ...geo, regionSize: 512 }), /power of two/);
  });

  it('keeps the complete flag', async () => {
    const m = RegionMap.open(dir, geo);
    for (let r = 0; r < m.count; r++) m.set(r, RegionState.Local);
    m.markComplete();
    await m.persist(m.snapshot());
    m.close();
    const again = RegionMap.open(dir, geo);
    assert.equal(again.complete, true);
    assert.equal(again.allLocal, true);
    again.close();
  });
});

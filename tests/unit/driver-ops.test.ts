import assert from 'node:assert/strict';
import fc from 'fast-check';
import { diskId } from '../../driver/src/api.js';
import { resolveDriverConfig } from '../../driver/src/config.js';
import { judgeRedis, parseInfo, type RedisFitness } from '../../driver/src/redis-fitness.js';

const base: RedisFitness = { persistence: 'aof', maxmemory_policy: 'noeviction', appendfsync: 'everysec', save: '', via: 'config', config_error: null, checked_at: '2026-01-01T00:00:00.000Z' };
const cfg = (o: Record<string, unknown> = {}) => resolveDriverConfig({ object: { auth: { disabled: true }, redis: o } }).redis;

describe('Redis fitness verdicts', () => {
  it('a noeviction Redis with AOF or snapshots is fit', () => {
    assert.deepEqual(judgeRedis(base, cfg(), 'r'), { refuse: null, warnings: [] });
    assert.deepEqual(judgeRedis({ ...base, persistence: 'rdb', appendfsync: null, save: '3600 1' }, cfg({ require_persistence: true }), 'r'), { refuse: null, warnings: [] });
  });

  it('refuses every evicting policy unless allowed, naming the setting and the fix', () => {
    for (const policy of ['allkeys-lru', 'volatile-lru', 'allkeys-random', 'volatile-ttl', 'allkeys-lfu']) {
      const v = judgeRedis({ ...base, maxmemory_policy: policy }, cfg(), 'redis://x:6379/0');
      assert.match(v.refuse!, new RegExp(`maxmemory-policy ${policy}.*CONFIG SET maxmemory-policy noeviction.*redis\\.allow_eviction: true`));
      const allowed = judgeRedis({ ...base, maxmemory_policy: policy }, cfg({ allow_eviction: true }), 'r');
      assert.equal(allowed.refuse, null);
      assert.match(allowed.warnings[0]!, /running anyway/);
    }
  });

  it('warns about no persistence, refuses it when required; unknown likewise, with what to verify by hand', () => {
    const none = { ...base, persistence: 'none' as const, appendfsync: null };
    assert.equal(judgeRedis(none, cfg(), 'r').refuse, null);
    assert.match(judgeRedis(none, cfg(), 'r').warnings[0]!, /persists nothing/);
    assert.match(judgeRedis(none, cfg({ require_persistence: true }), 'r').refuse!, /persists nothing.*require_persistence is true/);
    const unknown = { ...base, persistence: 'unknown' as const, via: 'info' as const, config_error: 'ERR unknown command', appendfsync: null, save: null };
    assert.match(judgeRedis(unknown, cfg(), 'r').warnings[0]!, /CONFIG GET was refused: ERR unknown command.*verify by hand/);
    assert.match(judgeRedis(unknown, cfg({ require_persistence: true }), 'r').refuse!, /once verified by hand/);
    assert.match(judgeRedis({ ...unknown, maxmemory_policy: 'unknown', persistence: 'aof' }, cfg(), 'r').warnings[0]!, /could not read maxmemory-policy.*verify by hand that it is noeviction/);
  });

  it('warns about appendfsync no', () => {
    assert.match(judgeRedis({ ...base, appendfsync: 'no' }, cfg(), 'r').warnings[0]!, /appendfsync no/);
  });

  it('parses INFO sections', () => {
    const m = parseInfo('# Persistence\r\naof_enabled:1\r\nrdb_saves:0\r\n# Memory\r\nmaxmemory_policy:noeviction\r\n');
    assert.equal(m.get('aof_enabled'), '1');
    assert.equal(m.get('maxmemory_policy'), 'noeviction');
  });
});

describe('reconcile config', () => {
  it("the default disk_id_pattern matches every id the driver makes", () => {
    const pattern = new RegExp(resolveDriverConfig({ object: { auth: { disabled: true } } }).reconcile.disk_id_pattern);
    const id = fc.stringMatching(/^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/);
    fc.assert(fc.property(id, id, (node, deployment) => pattern.test(diskId(node, deployment))));
    assert.equal(pattern.test('scratch'), false);
  });

  it('refuses a disk_id_pattern that is not a regular expression, naming the key', () => {
    assert.throws(() => resolveDriverConfig({ object: { auth: { disabled: true }, reconcile: { disk_id_pattern: '([' } } }), /reconcile\.disk_id_pattern" is not a regular expression/);
  });
});

import assert from 'node:assert/strict';
import fc from 'fast-check';
import { diskId } from '../../driver/src/api.js';
import { resolveDriverConfig } from '../../driver/src/config.js';
import { describeRedis, parseHostPort, reconnectOnReadonly, redisOptions } from '../../driver/src/redis-connect.js';
import { judgeRedis, parseInfo, type RedisFitness } from '../../driver/src/redis-fitness.js';

const base: RedisFitness = { persistence: 'aof', maxmemory_policy: 'noeviction', appendfsync: 'everysec', save: '', replicas: 0, via: 'config', config_error: null, checked_at: '2026-01-01T00:00:00.000Z' };
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

  it('warns when fewer replicas are connected than redis.wait_replicas asks for, saying what follows', () => {
    assert.deepEqual(judgeRedis({ ...base, replicas: 1 }, cfg({ wait_replicas: 1 }), 'r').warnings, []);
    assert.match(judgeRedis({ ...base, replicas: 0 }, cfg({ wait_replicas: 1 }), 'r').warnings[0]!, /0 replica\(s\) connected, and redis\.wait_replicas is 1: .*503 DRV_ERR_REDIS_REPLICATION/);
    assert.deepEqual(judgeRedis({ ...base, replicas: null }, cfg({ wait_replicas: 1 }), 'r').warnings, [], 'not known: nothing claimed');
    assert.deepEqual(judgeRedis({ ...base, replicas: 0 }, cfg(), 'r').warnings, [], 'a single Redis is not warned about');
  });

  it('parses INFO sections', () => {
    const m = parseInfo('# Persistence\r\naof_enabled:1\r\nrdb_saves:0\r\n# Memory\r\nmaxmemory_policy:noeviction\r\n');
    assert.equal(m.get('aof_enabled'), '1');
    assert.equal(m.get('maxmemory_policy'), 'noeviction');
  });
});

describe('Redis connections: one Redis or Sentinel', () => {
  const sentinel = { master_name: 'smartnic', nodes: ['10.0.0.5:26379', '[fd00::5]:26380', 'redis-a.example:26379'] };

  it('with redis.sentinel, connects through the sentinels and follows failovers; the URL gives credentials and database', () => {
    const c = cfg({ url: 'redis://:pw@ignored:1/3', sentinel: { ...sentinel, password: 'sentinel-secret' } });
    const o = redisOptions(c, 'patient');
    assert.equal(o.name, 'smartnic');
    assert.deepEqual(o.sentinels, [{ host: '10.0.0.5', port: 26379 }, { host: 'fd00::5', port: 26380 }, { host: 'redis-a.example', port: 26379 }]);
    assert.equal(o.sentinelPassword, 'sentinel-secret');
    assert.equal(o.failoverDetector, true);
    assert.equal(o.maxRetriesPerRequest, null);
    assert.equal(o.enableTLSForSentinelMode, false);
    assert.equal(redisOptions(cfg({ url: 'rediss://h/0', sentinel }), 'fail-fast').enableTLSForSentinelMode, true, 'rediss: TLS to the servers');
    const probe = redisOptions(c, 'probe');
    assert.equal(probe.sentinelRetryStrategy?.(1), null, 'a probe gives up when no sentinel answers');
    assert.equal(probe.failoverDetector, undefined);
    assert.equal(redisOptions(cfg(), 'patient').sentinels, undefined, 'no sentinel: the URL alone');
  });

  it('a command answered READONLY (a demoted primary) reconnects and is sent again; other errors are not', () => {
    assert.equal(reconnectOnReadonly(new Error("READONLY You can't write against a read only replica.")), 2);
    assert.equal(reconnectOnReadonly(new Error('ERR wrong number of arguments')), false);
    assert.equal(redisOptions(cfg(), 'fail-fast').reconnectOnError, reconnectOnReadonly);
  });

  it('names where Redis is without secrets', () => {
    assert.equal(describeRedis(cfg({ url: 'redis://:pw@h:6379/0' })), 'redis://REDACTED@h:6379/0');
    assert.equal(describeRedis(cfg({ url: 'redis://:pw@h/2', sentinel: { ...sentinel, password: 'x' } })), 'the primary "smartnic" of sentinels 10.0.0.5:26379,[fd00::5]:26380,redis-a.example:26379 (db 2)');
  });

  it('refuses sentinel nodes that are not host:port, naming the key', () => {
    for (const bad of ['10.0.0.5', 'redis://h:26379', 'h:port', '[fd00::5]']) {
      assert.throws(() => cfg({ sentinel: { master_name: 'm', nodes: [bad] } }), /redis\.sentinel\.nodes/, bad);
    }
    assert.throws(() => cfg({ sentinel: { nodes: ['h:1'] } }), /master_name/);
    assert.throws(() => parseHostPort('h:70000'), /not host:port/);
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

import assert from 'node:assert/strict';
import fs from 'node:fs';
import { fileURLToPath } from 'node:url';
import { ConfigError, renderConfigDocs } from '../../common/src/config.js';
import { DRIVER_CONFIG_SCHEMA, resolveDriverConfig } from '../../driver/src/config.js';

describe('driver config', () => {
  it('docs/driver.md carries the current reference table', () => {
    const doc = fs.readFileSync(fileURLToPath(new URL('../../../docs/driver.md', import.meta.url)), 'utf8');
    assert.ok(doc.includes(renderConfigDocs(DRIVER_CONFIG_SCHEMA)), 'regenerate: node dist/lab/render-docs.js');
  });

  it('fills defaults and freezes', () => {
    const c = resolveDriverConfig({ object: { auth: { tokens: ['x'.repeat(16)] } } });
    assert.equal(c.listen.port, 9612);
    assert.equal(c.redis.prefix, 'smartnic');
    assert.equal(c.jobs.attach_attempts, 8);
    assert.ok(Object.isFrozen(c.jobs));
  });

  it('names the bad key', () => {
    assert.throws(() => resolveDriverConfig({ object: { listen: { port: 70000 }, auth: { disabled: true } } }), (e: unknown) => e instanceof ConfigError && e.key === 'listen.port' && /listen\.port" must be <= 65535/.test(e.message));
    assert.throws(() => resolveDriverConfig({ object: { jobz: {}, auth: { disabled: true } } }), /config key "jobz" is not known/);
    assert.throws(() => resolveDriverConfig({ object: { redis: { url: 'http://x' }, auth: { disabled: true } } }), /redis\.url/);
    // Every disk would drop out of the peer lists between two polls.
    assert.throws(
      () => resolveDriverConfig({ object: { peers: { enabled: true, announce_ttl_ms: 2000 }, jobs: { monitor_interval_ms: 5000 }, auth: { disabled: true } } }),
      (e: unknown) => e instanceof ConfigError && e.key === 'peers.announce_ttl_ms' && /longer than jobs\.monitor_interval_ms/.test(e.message),
    );
    assert.throws(() => resolveDriverConfig({ object: { peers: { secret: 'short' }, auth: { disabled: true } } }), /peers\.secret/);
  });

  it('refuses to run without authentication unless told to', () => {
    assert.throws(() => resolveDriverConfig({ object: {} }), /no token configured/);
    assert.equal(resolveDriverConfig({ object: { auth: { disabled: true } } }).auth.tokens.length, 0);
  });
});

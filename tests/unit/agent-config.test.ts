import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { ConfigError, renderConfigDocs } from '../../common/src/config.js';
import { AGENT_CONFIG_SCHEMA, parseAgentConfig, resolveTokens } from '../../dpu-agent/src/daemon/config.js';
import { encodeRle } from '../../dpu-agent/src/daemon/disks.js';
import { errorReply } from '../../dpu-agent/src/daemon/api.js';
import { DpuError } from '../../image-access/src/errors.js';
import { tempDir } from '../helpers/agent.js';

const TOKEN = 'a-token-of-sixteen-chars';

describe('agent daemon config', () => {
  it('docs/dpu-agent.md carries the current config reference table', () => {
    const doc = fs.readFileSync(fileURLToPath(new URL('../../../docs/dpu-agent.md', import.meta.url)), 'utf8');
    assert.ok(doc.includes(renderConfigDocs(AGENT_CONFIG_SCHEMA)), 'regenerate the table in docs/dpu-agent.md from renderConfigDocs(AGENT_CONFIG_SCHEMA)');
  });

  it('fills nested defaults and keeps what is given', () => {
    const c = parseAgentConfig({ auth: { tokens: [TOKEN] }, listen: { port: 1234 }, defaults: { bandwidth: 5 } }, 'cfg');
    assert.equal(c.listen.host, '127.0.0.1');
    assert.equal(c.listen.port, 1234);
    assert.equal(c.defaults.region_size, 1 << 20);
    assert.equal(c.defaults.bandwidth, 5);
    assert.equal(c.defaults.hydrate_connections, 2);
    assert.equal(c.tcp_exports_allowed, false);
    assert.deepEqual(c.allowed_targets, ['/dev/nvme', '/var/lib/dpu-agent/targets/']);
    assert.ok(Object.isFrozen(c.defaults));
  });

  it('refuses to run without a token unless authentication is disabled', () => {
    assert.throws(() => parseAgentConfig({}, 'cfg'), (err: Error) => err instanceof ConfigError && err.key === 'auth.tokens' && /authenticated by default/.test(err.message));
    assert.equal(parseAgentConfig({ auth: { disabled: true } }, 'cfg').auth.disabled, true);
    assert.throws(() => parseAgentConfig({ auth: { tokens: ['short'] } }, 'cfg'), /auth\.tokens\.0/);
  });

  it('names the bad key', () => {
    assert.throws(() => parseAgentConfig({ auth: { tokens: [TOKEN] }, listen: { prot: 1 } }, 'cfg'), /"listen\.prot" is not known/);
    assert.throws(() => parseAgentConfig({ auth: { tokens: [TOKEN] }, defaults: { region_size: 3 << 12 } }, 'cfg'), /"defaults\.region_size" must be a power of two/);
    assert.throws(() => parseAgentConfig({ auth: { tokens: [TOKEN] }, log_level: 'loud' }, 'cfg'), /"log_level" must be one of/);
  });

  it('reads tokens from token_file, skipping blank lines and comments', () => {
    const { dir, cleanup } = tempDir('agent-config');
    try {
      const file = path.join(dir, 'tokens');
      fs.writeFileSync(file, `# ops\n\n${TOKEN}\n  second-token-0123456789  \n`);
      const c = parseAgentConfig({ auth: { token_file: file } }, 'cfg');
      assert.deepEqual(resolveTokens(c), [TOKEN, 'second-token-0123456789']);
      assert.throws(() => parseAgentConfig({ auth: { token_file: path.join(dir, 'missing') } }, 'cfg'), /auth\.token_file.*cannot read/);
    } finally {
      cleanup();
    }
  });
});

describe('agent daemon helpers', () => {
  it('run-length encodes region states', () => {
    assert.equal(encodeRle(Uint8Array.from([3, 3, 3, 2, 0, 0, 1])), '3L1f2r1z');
    assert.equal(encodeRle(new Uint8Array(0)), '');
    assert.equal(encodeRle(new Uint8Array(2048)), '2048r');
  });

  it('maps failures to API statuses and Error bodies', () => {
    assert.deepEqual(errorReply(new DpuError('DPU_ERR_NOT_FOUND', 'no disk "x"')), {
      status: 404,
      body: { code: 'DPU_ERR_NOT_FOUND', message: 'no such disk or endpoint: no disk "x"', retryable: false },
    });
    assert.equal(errorReply(new DpuError('DPU_ERR_SOURCE_HTTP_STATUS', 'HTTP 404')).status, 502);
    assert.equal(errorReply(new DpuError('DPU_ERR_TARGET_NOT_ALLOWED', 'x', { field: 'target.path' })).body.field, 'target.path');
    const validation = Object.assign(new Error('body.id must match pattern'), { validation: [{}], statusCode: 400, field: 'id' });
    assert.deepEqual(errorReply(validation).body, { code: 'DPU_ERR_BAD_REQUEST', message: 'the request is malformed: body.id must match pattern', retryable: false, field: 'id' });
    const internal = errorReply(new TypeError('boom'));
    assert.equal(internal.status, 500);
    assert.equal(internal.body.code, 'DPU_ERR_INTERNAL');
  });
});

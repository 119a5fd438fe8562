/**
 * TLS on the agent's API (config listen.tls), between agents (peers.ca) and from the driver
 * (agent.ca), with real processes: redis-server, three DPU agent daemons serving HTTPS,
 * the driver service with peers enabled, an HTTP origin, and a throw-away PKI made with
 * openssl. Two agents trust the CA that signed every agent's certificate; the third trusts
 * another CA, so its peers fail the TLS check: it must still complete, from the origin,
 * and say why in its log. Observed through the origin's counters, the agents' disk views
 * and logs, and the driver's API.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { pino } from 'pino';
import { ConfigError } from '../../common/src/config-error.js';
import { parseAgentConfig } from '../../dpu-agent/src/daemon/config.js';
import { PeerFirstSource } from '../../dpu-agent/src/streaming/peer-source.js';
import { resolveDriverConfig } from '../../driver/src/config.js';
import { AgentClient } from '../../openapi/clients/agent-client.js';
import { type Deployment, type DeploymentCreate, DriverClient } from '../../openapi/clients/driver-client.js';
import { ApiError } from '../../openapi/clients/http.js';
import { makeImage, tempDir } from '../helpers/agent.js';
import { MemorySource } from '../helpers/memory-source.js';
import { TestOrigin } from '../helpers/origin.js';
import { RedisServer } from '../helpers/redis.js';
import { agentDaemon, deploymentIn, driverService, type ServiceProcess, TOKEN, until } from '../helpers/services.js';
import { issue, makeCa } from '../helpers/tls-certs.js';

const MiB = 1 << 20;
const IMAGE_BYTES = 8 * MiB;

describe('TLS on the agent API, between agents and from the driver', function () {
  this.timeout(120_000);
  let dir: string;
  let cleanup: () => void;
  let imageBytes: Buffer;
  let sha512: string;
  let origin: TestOrigin;
  let redis: RedisServer;
  let ca: { cert: string; key: string };
  let otherCa: { cert: string; key: string };
  let server: { cert: string; key: string };
  /** a and b trust `ca`, which signed every agent's certificate; c trusts `otherCa` only. */
  const agents: Record<'a' | 'b' | 'c', ServiceProcess> = {} as never;
  let driver: ServiceProcess;
  let api: DriverClient;

  before(async () => {
    ({ dir, cleanup } = tempDir('agent-tls'));
    const image = path.join(dir, 'image.raw');
    makeImage(image, IMAGE_BYTES, 31);
    imageBytes = fs.readFileSync(image);
    sha512 = createHash('sha512').update(imageBytes).digest('hex');
    ca = await makeCa(path.join(dir, 'pki'));
    server = await issue(path.join(dir, 'pki'), ca, 'server', 'dpu-agent');
    otherCa = await makeCa(path.join(dir, 'other-pki'), 'another CA');
    origin = new TestOrigin({ file: image });
    await origin.start();
    redis = new RedisServer(path.join(dir, 'redis'));
    await redis.start();
    for (const name of ['a', 'b', 'c'] as const) {
      agents[name] = await agentDaemon({
        dir: path.join(dir, name),
        extra: { listen: { host: '127.0.0.1', port: 0, tls: server }, peers: { ca: name === 'c' ? otherCa.cert : ca.cert } },
      });
      await agents[name].start();
    }
    // A non-seeder whose peers fail waits origin_wait_ms for them before the origin.
    driver = await driverService({ dir, redisUrl: redis.url, extra: { agent: { token: TOKEN, timeout_ms: 5000, ca: ca.cert }, peers: { enabled: true, origin_wait_ms: 2000 } } });
    await driver.start();
    api = new DriverClient({ baseUrl: driver.url, token: TOKEN });
    await until('the driver reaches Redis', () => api.listDeployments().then(() => true));
  });
  after(async () => {
    await driver?.stop();
    for (const a of Object.values(agents)) await a.stop();
    await redis?.stop();
    await origin?.stop();
    cleanup();
  });

  const target = (a: 'a' | 'b' | 'c', node: string): string => path.join(dir, a, 'targets', `${node}.raw`);
  const agentApi = (a: 'a' | 'b' | 'c'): AgentClient => new AgentClient({ baseUrl: agents[a].url, token: TOKEN, ca: fs.readFileSync(ca.cert) });
  const request = (a: 'a' | 'b' | 'c', node: string): DeploymentCreate => ({
    node_uuid: node,
    instance_info: { image_source: origin.url, image_os_hash_algo: 'sha512', image_os_hash_value: sha512 },
    driver_info: { smartnic_agent_url: agents[a].url, smartnic_target: target(a, node), smartnic_require_verification: true },
  });
  const complete = (node: string): Promise<Deployment> => deploymentIn(api, node, ['complete'], 60_000);

  it('the API answers HTTPS only: with the CA, a client is served; without it or over plain HTTP, it is not', async () => {
    for (const a of Object.values(agents)) assert.match(a.url, /^https:\/\/127\.0\.0\.1:\d+$/);
    assert.equal((await agentApi('a').health()).status, 'ok');
    // The system's store does not hold the test CA: refused, with what to do.
    await assert.rejects(new AgentClient({ baseUrl: agents.a.url, token: TOKEN }).health(), (err: ApiError) => err.code === 'UNREACHABLE' && /not trusted.*trust the CA that signs it$/.test(err.message));
    // Plain HTTP to the TLS port gets no answer.
    await assert.rejects(new AgentClient({ baseUrl: agents.a.url.replace('https:', 'http:'), token: TOKEN, timeoutMs: 5000 }).health(), (err: ApiError) => err.code === 'UNREACHABLE');
  });

  it('the driver deploys through HTTPS; a second agent copies every region from the first over TLS, none from the origin', async () => {
    const first = await complete((await api.createDeployment(request('a', 'node-t1'))).node_uuid);
    await until('node-t1 verified', async () => ((await agentApi('a').getDisk(first.disk_id)).verified ? true : null), 60_000);
    await until('node-t1 listed as a seed', async () => Date.parse((await api.getDeployment('node-t1')).peers?.listed_until ?? '') > Date.now() + 30 * 60_000);

    const sent = origin.stats.bytesSent;
    await api.createDeployment(request('b', 'node-t2'));
    const second = await complete('node-t2');
    assert.ok(fs.readFileSync(target('b', 'node-t2')).equals(imageBytes), 'the second target is the image');
    const disk = await agentApi('b').getDisk(second.disk_id);
    assert.equal(disk.integrity_failures, 0);
    assert.equal(disk.peers.sources, 1);
    assert.ok(disk.peers.bytes_from_peers > 0 && disk.peers.fallbacks === 0, JSON.stringify(disk.peers));
    assert.equal((await agentApi('a').getDisk(first.disk_id)).peers.bytes_served, disk.peers.bytes_from_peers);
    assert.ok(origin.stats.bytesSent - sent < 4096, `the origin sent ${origin.stats.bytesSent - sent} bytes for the second disk`);
  });

  it('an agent that does not trust its peers\' certificates reads nothing from them: it completes from the origin and says why, once per peer', async () => {
    const sent = origin.stats.bytesSent;
    await api.createDeployment(request('c', 'node-t3'));
    const third = await complete('node-t3');
    assert.ok(fs.readFileSync(target('c', 'node-t3')).equals(imageBytes), 'the third target is the image');
    const disk = await agentApi('c').getDisk(third.disk_id);
    assert.equal(disk.peers.sources, 2, 'both disks before it are listed');
    assert.equal(disk.peers.bytes_from_peers, 0);
    assert.equal(disk.integrity_failures, 0);
    assert.ok(origin.stats.bytesSent - sent > IMAGE_BYTES / 2, `the origin sent ${origin.stats.bytesSent - sent} bytes`);
    const warnings = agents.c.output.split('\n').filter((l) => l.includes("a peer's certificate is not trusted"));
    assert.equal(warnings.length, 2, `one warning per peer:\n${warnings.join('\n')}`);
    for (const w of warnings) {
      const line = JSON.parse(w) as { level: number; code: string; peer: string };
      assert.equal(line.level, 40);
      assert.equal(line.code, 'UNABLE_TO_VERIFY_LEAF_SIGNATURE', 'the CA it trusts did not sign the peer\'s certificate');
      assert.ok([agents.a.url, agents.b.url].includes(line.peer), line.peer);
    }
  });

  it('a driver that does not trust the agents\' CA refuses the node at validation, and says what to set', async () => {
    const other = await driverService({ dir: path.join(dir, 'untrusting'), redisUrl: redis.url, extra: { redis: { url: redis.url, prefix: 'untrusting' } } });
    await other.start();
    try {
      const client = new DriverClient({ baseUrl: other.url, token: TOKEN });
      await assert.rejects(client.validate({ node_uuid: 'node-t4', instance_info: request('a', 'node-t4').instance_info, driver_info: request('a', 'node-t4').driver_info }), (err: ApiError) =>
        err.code === 'DRV_ERR_INVALID' && err.field === 'driver_info.smartnic_agent_url' && /does not answer.*not trusted.*agent\.ca/.test(err.message));
    } finally {
      await other.stop();
    }
  });

  it('a certificate that does not name the host in the URL is refused by the driver and by peers, though its CA is trusted', async () => {
    const pkiD = path.join(dir, 'pki-d');
    fs.mkdirSync(pkiD);
    const elsewhere = await issue(pkiD, ca, 'server', 'dpu-agent', 'DNS:elsewhere.example');
    const d = await agentDaemon({ dir: path.join(dir, 'd'), extra: { listen: { host: '127.0.0.1', port: 0, tls: elsewhere }, peers: { ca: ca.cert } } });
    await d.start();
    try {
      await assert.rejects(api.validate({ instance_info: request('a', 'node-t5').instance_info, driver_info: { ...request('a', 'node-t5').driver_info, smartnic_agent_url: d.url } }), (err: ApiError) =>
        err.code === 'DRV_ERR_INVALID' && /ERR_TLS_CERT_ALTNAME_INVALID.*does not name the host/.test(err.message));
      // A peer at that URL: its map read fails the check, said once at warn, and the peer is left alone.
      const lines: string[] = [];
      const log = pino({ level: 'debug' }, { write: (l: string) => void lines.push(l) });
      const src = new PeerFirstSource(new MemorySource(Buffer.alloc(4 * MiB)), MiB, log, fs.readFileSync(ca.cert));
      src.verifiedBy(() => true);
      src.setPeers([{ url: d.url, disk: 'any' }, { url: d.url, disk: 'other' }], 'a-peer-token-of-sixteen', 60_000);
      try {
        // Both disks' maps are read when the list is set; each read fails the check, and
        // then the peer is left alone (TLS_RETRY_MS) instead of being asked every tick.
        await until('both map reads failed', async () => lines.filter((l) => l.includes('ERR_TLS_CERT_ALTNAME_INVALID')).length >= 2 || null, 10_000, 20);
        const failures = lines.map((l) => JSON.parse(l) as { level: number; code?: string }).filter((l) => l.code === 'ERR_TLS_CERT_ALTNAME_INVALID');
        assert.deepEqual(failures.map((l) => l.level), [40, 20], 'one warning for the one URL, whatever its disks; the other failure at debug');
      } finally {
        await src.close();
      }
    } finally {
      await d.stop();
    }
  });

  it('a wrong TLS file stops start-up with the key and what to do', () => {
    const base = { auth: { tokens: [TOKEN] } };
    const wrong: [unknown, string, RegExp][] = [
      [{ listen: { tls: { cert: server.cert, key: ca.key } } }, 'listen.tls.key', /config key "listen\.tls\.key" .*ca-key\.pem is not the private key of the certificate/],
      [{ listen: { tls: { cert: path.join(dir, 'nope.pem'), key: server.key } } }, 'listen.tls.cert', /config key "listen\.tls\.cert" .*nope\.pem: cannot read it \(ENOENT\)/],
      [{ listen: { tls: { cert: server.cert } } }, 'listen.tls.key', /listen\.tls.*key/],
      [{ peers: { ca: server.key } }, 'peers.ca', /config key "peers\.ca" .*server-key\.pem holds no PEM certificate/],
    ];
    for (const [extra, key, message] of wrong) {
      assert.throws(() => parseAgentConfig({ ...base, ...(extra as object) }, 'agent.yaml'), (err: Error) => err instanceof ConfigError && err.key === key && message.test(err.message), JSON.stringify(extra));
    }
    // A bundle with a damaged certificate after a good one: refused, not half trusted.
    const bundle = path.join(dir, 'bundle.pem');
    const good = fs.readFileSync(ca.cert, 'latin1');
    fs.writeFileSync(bundle, good + good.replace(/\n[A-Za-z0-9+/]{8}/, '\n!!!!!!!!'));
    assert.throws(() => resolveDriverConfig({ object: { auth: { tokens: [TOKEN] }, agent: { ca: bundle } } }), (err: Error) => err instanceof ConfigError && err.key === 'agent.ca' && /certificate 2 of 2 does not parse/.test(err.message));
    assert.ok(resolveDriverConfig({ object: { auth: { tokens: [TOKEN] }, agent: { ca: ca.cert } } }));
  });
});

/**
 * A small fleet across network namespaces (issue #15, docs/fleet.md): four DPU agent
 * daemons, each in a namespace of its own behind a link shaped to 4 MiB/s each way
 * (tests/helpers/netns.ts), the origin's link shaped to 4 MiB/s for all of them, Redis and
 * the driver service (peers.enabled) in this namespace. One image deployed to the four
 * nodes at once: every target is the image, the origin sends one copy, the peers the other
 * three — through real links whose uploads are capped, so the seeder cannot serve everyone
 * at once and the others wait for busy peers rather than read the origin. Needs root
 * (network namespaces); observed through counters and the targets, never the clock.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { AgentClient } from '../../openapi/clients/agent-client.js';
import { DriverClient } from '../../openapi/clients/driver-client.js';
import { makeImage, tempDir } from '../helpers/agent.js';
import { NetLab } from '../helpers/netns.js';
import { TestOrigin } from '../helpers/origin.js';
import { freePort, RedisServer } from '../helpers/redis.js';
import { agentDaemon, deploymentGone, deploymentIn, driverService, type ServiceProcess, TOKEN, until } from '../helpers/services.js';

const MiB = 1 << 20;
const IMAGE_BYTES = 16 * MiB;
const LINK = 4 * MiB;
const NODES = 4;

describe('a fleet in network namespaces behind shaped links (peers on)', function () {
  this.timeout(300_000);
  let dir: string;
  let cleanup: () => void;
  let lab: NetLab;
  let redis: RedisServer;
  let agents: ServiceProcess[];
  let driver: ServiceProcess;
  let api: DriverClient;

  before(async function () {
    assert.ok(NetLab.available(), 'this test makes network namespaces: run it as root, with iproute2 (scripts/install-deps.sh installs it)');
    ({ dir, cleanup } = tempDir('fleet-netns'));
    lab = new NetLab('10.68');
    lab.start();
    redis = new RedisServer(path.join(dir, 'redis'));
    await redis.start();
    agents = [];
    for (let i = 0; i < NODES; i++) {
      const host = lab.addHost({ up: LINK, down: LINK });
      const a = await agentDaemon({ dir: path.join(dir, `agent-${i}`), host: host.ip, port: 9611, wrap: host.exec });
      await a.start();
      agents.push(a);
    }
    driver = await driverService({ dir, redisUrl: redis.url, extra: { peers: { enabled: true } } });
    await driver.start();
    api = new DriverClient({ baseUrl: driver.url, token: TOKEN });
    await until('the driver reaches Redis', () => api.listDeployments().then(() => true));
  });
  after(async () => {
    await driver?.stop();
    for (const a of agents ?? []) await a.stop();
    await redis?.stop();
    const left = lab?.stop() ?? [];
    cleanup?.();
    assert.deepEqual(left, [], 'every namespace and link removed');
  });

  it('one image to four nodes at once: every target is the image, the origin sends one copy, peers the rest', async () => {
    const image = path.join(dir, 'image.raw');
    makeImage(image, IMAGE_BYTES, 31);
    const bytes = fs.readFileSync(image);
    const info = { image_os_hash_algo: 'sha512' as const, image_os_hash_value: createHash('sha512').update(bytes).digest('hex') };
    const target = (i: number, node: string): string => path.join(dir, `agent-${i}`, 'targets', `${node}.raw`);
    // The image deployed once before (its manifest cached), from an origin port left unshaped.
    const warm = new TestOrigin({ file: image });
    const warmUrl = await warm.start(lab.rootIp);
    try {
      await api.createDeployment({ node_uuid: 'warm', instance_info: { image_source: warmUrl, ...info }, driver_info: { smartnic_agent_url: agents[0]!.url, smartnic_target: target(0, 'warm'), smartnic_require_verification: true } });
      await deploymentIn(api, 'warm', ['complete'], 120_000);
      await api.deleteDeployment('warm');
      await deploymentGone(api, 'warm');
    } finally {
      await warm.stop();
    }

    const port = await freePort();
    lab.shapeFromRoot(port, LINK);
    const origin = new TestOrigin({ file: image });
    const url = await origin.start(lab.rootIp, port);
    try {
      const nodes = agents.map((_, i) => `node-${i}`);
      await Promise.all(nodes.map((node, i) => api.createDeployment({ node_uuid: node, instance_info: { image_source: url, ...info }, driver_info: { smartnic_agent_url: agents[i]!.url, smartnic_target: target(i, node) } })));
      const done = await Promise.all(nodes.map((n) => deploymentIn(api, n, ['complete'], 240_000)));
      const disks = await Promise.all(done.map((d, i) => new AgentClient({ baseUrl: agents[i]!.url, token: TOKEN }).getDisk(d.disk_id)));
      for (const [i, n] of nodes.entries()) assert.ok(fs.readFileSync(target(i, n)).subarray(0, IMAGE_BYTES).equals(bytes), `${n}'s target is the image`);
      let data = 0;
      for (let o = 0; o < IMAGE_BYTES; o += disks[0]!.region_size) if (bytes.subarray(o, o + disks[0]!.region_size).some((b) => b !== 0)) data += disks[0]!.region_size;
      const fromPeers = disks.reduce((n, d) => n + d.peers.bytes_from_peers, 0);
      const served = disks.reduce((n, d) => n + d.peers.bytes_served, 0);
      const causes = JSON.stringify(disks.map((d) => d.peers.fallback_causes));
      assert.ok(origin.stats.bytesSent < data + 64 * 1024, `the origin sent ${origin.stats.bytesSent} bytes for the fleet; one copy is ${data} (fallbacks: ${causes})`);
      assert.equal(fromPeers, (NODES - 1) * data, `from peers: ${disks.map((d) => d.peers.bytes_from_peers).join(', ')} (fallbacks: ${causes})`);
      assert.equal(served, fromPeers, 'what peers sent is what the disks took from peers');
      for (const d of disks) assert.equal(d.integrity_failures, 0);
      for (const n of nodes) await api.deleteDeployment(n);
      for (const n of nodes) await deploymentGone(api, n);
    } finally {
      await origin.stop();
    }
  });
});

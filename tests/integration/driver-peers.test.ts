/**
 * Peer-to-peer regions through the control plane (issue #15, docs/fleet.md), with real
 * processes: redis-server, two DPU agent daemons, the driver service with peers.enabled,
 * an HTTP origin. The driver is the tracker: it gives each disk of an image the image's
 * peer token and a list of the image's other disks; the agents copy verified regions from
 * each other. Observed through the origin's counters, the agents' disk views and the
 * driver's API; nothing waits on time except polls with generous deadlines.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { Redis } from 'ioredis';
import { AgentClient, type Disk } from '../../openapi/clients/agent-client.js';
import { type Deployment, type DeploymentCreate, DriverClient } from '../../openapi/clients/driver-client.js';
import { type PeerHolder, PeerTracker } from '../../driver/src/peers.js';
import { makeImage, tempDir } from '../helpers/agent.js';
import { TestOrigin } from '../helpers/origin.js';
import { RedisServer } from '../helpers/redis.js';
import { agentDaemon, deploymentGone, deploymentIn, driverService, type ServiceProcess, TOKEN, until } from '../helpers/services.js';

const MiB = 1 << 20;
const IMAGE_BYTES = 16 * MiB;

describe('driver service: peer-to-peer regions (the driver as tracker)', function () {
  this.timeout(120_000);
  let dir: string;
  let cleanup: () => void;
  let image: string;
  let imageBytes: Buffer;
  let sha512: string;
  let origin: TestOrigin;
  let redis: RedisServer;
  let agents: ServiceProcess[];
  let driver: ServiceProcess;
  let api: DriverClient;

  before(async () => {
    ({ dir, cleanup } = tempDir('driver-peers'));
    image = path.join(dir, 'image.raw');
    makeImage(image, IMAGE_BYTES, 23);
    imageBytes = fs.readFileSync(image);
    sha512 = createHash('sha512').update(imageBytes).digest('hex');
    origin = new TestOrigin({ file: image });
    await origin.start();
    redis = new RedisServer(path.join(dir, 'redis'));
    await redis.start();
    agents = [];
    for (const name of ['agent-a', 'agent-b']) {
      const a = await agentDaemon({ dir: path.join(dir, name) });
      await a.start();
      agents.push(a);
    }
    driver = await driverService({ dir, redisUrl: redis.url, extra: { peers: { enabled: true }, log_level: 'debug' } });
    await driver.start();
    api = new DriverClient({ baseUrl: driver.url, token: TOKEN });
    await until('the driver reaches Redis', () => api.listDeployments().then(() => true));
  });
  after(async () => {
    await driver?.stop();
    for (const a of agents ?? []) await a.stop();
    await redis?.stop();
    await origin?.stop();
    cleanup();
  });

  const agentDir = (a: number): string => path.join(dir, a === 0 ? 'agent-a' : 'agent-b');
  const target = (a: number, node: string): string => path.join(agentDir(a), 'targets', `${node}.raw`);
  const agentApi = (a: number): AgentClient => new AgentClient({ baseUrl: agents[a]!.url, token: TOKEN });
  const request = (a: number, node: string, info: Partial<DeploymentCreate['instance_info']> = { image_os_hash_algo: 'sha512', image_os_hash_value: sha512 }): DeploymentCreate => ({
    node_uuid: node,
    instance_info: { image_source: origin.url, ...info },
    driver_info: { smartnic_agent_url: agents[a]!.url, smartnic_target: target(a, node) },
  });
  const complete = (node: string): Promise<Deployment> => deploymentIn(api, node, ['complete'], 60_000);
  const verified = (a: number, diskId: string): Promise<Disk> =>
    until(`${diskId} verified`, async () => {
      const d = await agentApi(a).getDisk(diskId);
      return d.verified ? d : null;
    }, 60_000);
  /** Bytes of the image's regions that are not all zeros (what a disk has to copy). */
  const dataBytes = (regionSize: number): number => {
    let n = 0;
    for (let o = 0; o < IMAGE_BYTES; o += regionSize) {
      const r = imageBytes.subarray(o, Math.min(o + regionSize, IMAGE_BYTES));
      if (r.some((b) => b !== 0)) n += r.length;
    }
    return n;
  };

  it('the first disk of an image reads the origin; a second, on another agent, copies every region from it, none from the origin', async () => {
    // Verification required: the disk waits for the manifest, so it is verified (and can
    // serve) however fast it completes.
    await api.createDeployment({ ...request(0, 'node-p1'), driver_info: { ...request(0, 'node-p1').driver_info, smartnic_require_verification: true } });
    const first = await complete('node-p1');
    const seed = await verified(0, first.disk_id);
    assert.equal(seed.peers.offered, true, 'created with the image\'s peer token');
    assert.ok(first.peers?.enabled, JSON.stringify(first.peers));
    // Complete: listed for the seeding time (peers.seed_time_ms, 1 h by default).
    // Complete and verified: listed as a seed for the seeding time (peers.seed_time_ms, 1 h by default).
    await until('node-p1 listed as a seed', async () => {
      const listed = Date.parse((await api.getDeployment('node-p1')).peers?.listed_until ?? '');
      return listed > Date.now() + 30 * 60_000;
    });

    const fromOrigin = origin.stats.bytesSent;
    const regionRequests = origin.stats.rangeRequests;
    await api.createDeployment(request(1, 'node-p2'));
    const second = await complete('node-p2');
    assert.ok(fs.readFileSync(target(1, 'node-p2')).equals(imageBytes), 'the second target is the image');
    const leech = await agentApi(1).getDisk(second.disk_id);
    assert.equal(leech.integrity_failures, 0);
    assert.equal(leech.peers.sources, 1, 'its list names the first disk');
    assert.equal(leech.peers.bytes_from_peers, dataBytes(leech.region_size), 'every region with data came from the peer');
    // The origin was asked at most to describe the image (the driver's and the agent's probes).
    assert.ok(origin.stats.bytesSent - fromOrigin < 4096, `the origin sent ${origin.stats.bytesSent - fromOrigin} bytes for the second disk`);
    assert.ok(origin.stats.rangeRequests - regionRequests <= 2, `${origin.stats.rangeRequests - regionRequests} range requests for the second disk`);
    assert.equal((await agentApi(0).getDisk(first.disk_id)).peers.bytes_served, leech.peers.bytes_from_peers);
    const d2 = await until('the monitor records what came from peers', async () => {
      const d = await api.getDeployment('node-p2');
      return d.peers && d.peers.bytes_from_peers > 0 ? d : null;
    });
    assert.equal(d2.peers!.sources, 1);
    assert.equal(d2.peers!.note, null);

    // Both disks have the one token of the image; it is in no API answer and no log line.
    const tokens = [0, 1].map((a) => (JSON.parse(fs.readFileSync(path.join(agentDir(a), 'state', 'disks', a === 0 ? first.disk_id : second.disk_id, 'spec.json'), 'utf8')) as { peers?: { token: string } }).peers?.token);
    assert.ok(tokens[0] && tokens[0].length >= 16, 'the first disk has a token');
    assert.equal(tokens[1], tokens[0], 'one token per image');
    const answers = JSON.stringify([await api.listDeployments(), await api.getDeployment('node-p1'), await agentApi(0).listDisks(), await agentApi(1).listDisks()]);
    for (const [what, text] of [['API answers', answers], ['driver log', driver.output], ['agent logs', agents.map((a) => a.output).join('')]] as const) {
      assert.ok(!text.includes(tokens[0]!), `the token appears in the ${what}`);
    }
  });

  it('a torn-down disk leaves the lists at once: the next disk is told only of the disks still there', async () => {
    await api.deleteDeployment('node-p1');
    await deploymentGone(api, 'node-p1');
    await api.createDeployment(request(0, 'node-p3'));
    const third = await complete('node-p3');
    const disk = await agentApi(0).getDisk(third.disk_id);
    assert.equal(disk.peers.sources, 1, `only node-p2 is listed: ${JSON.stringify(disk.peers)}`);
    assert.equal(disk.peers.bytes_from_peers, dataBytes(disk.region_size));
    assert.ok(fs.readFileSync(target(0, 'node-p3')).equals(imageBytes));
    const p2 = await api.getDeployment('node-p2');
    assert.equal((await agentApi(1).getDisk(p2.disk_id)).peers.bytes_served, disk.peers.bytes_from_peers, 'node-p2 served it');
    for (const n of ['node-p2', 'node-p3']) await api.deleteDeployment(n);
    for (const n of ['node-p2', 'node-p3']) await deploymentGone(api, n);
    const r = new Redis(redis.url);
    try {
      // The groups' hashes (not the secret, seeder slots, probe or ban keys).
      const groups = (await r.keys('test:peers:*')).filter((k) => /^test:peers:[0-9a-f]{64}$/.test(k));
      const left = await Promise.all(groups.map((k) => r.hlen(k)));
      assert.deepEqual(left, groups.map(() => 0), 'no disk left listed');
    } finally {
      r.disconnect();
    }
  });

  it('four disks of an image at once: one seeder reads the origin, the others wait for peers; the origin sends one copy', async () => {
    // Its own image behind a slow origin (4 MiB/s): the seeder takes seconds, so the others
    // really start before it has regions. Its manifest is cached by a first deployment
    // (an image deployed before); the fleet's count starts after it.
    const fleetImage = path.join(dir, 'fleet.raw');
    makeImage(fleetImage, IMAGE_BYTES, 29);
    const fleetBytes = fs.readFileSync(fleetImage);
    const slow = new TestOrigin({ file: fleetImage, rate: 4 * MiB });
    const url = await slow.start();
    try {
      const info = { image_os_hash_algo: 'sha512', image_os_hash_value: createHash('sha512').update(fleetBytes).digest('hex') };
      const req = (a: number, node: string): DeploymentCreate => ({ ...request(a, node, info), instance_info: { image_source: url, ...info } });
      await api.createDeployment({ ...req(0, 'node-f0'), driver_info: { ...req(0, 'node-f0').driver_info, smartnic_require_verification: true } });
      await complete('node-f0');
      await api.deleteDeployment('node-f0');
      await deploymentGone(api, 'node-f0');

      const sent = slow.stats.bytesSent;
      const nodes = ['node-f1', 'node-f2', 'node-f3', 'node-f4'];
      await Promise.all(nodes.map((n, i) => api.createDeployment(req(i % 2, n))));
      const done = await Promise.all(nodes.map((n) => complete(n)));
      const disks = await Promise.all(done.map((d, i) => agentApi(i % 2).getDisk(d.disk_id)));
      for (const [i, n] of nodes.entries()) assert.ok(fs.readFileSync(target(i % 2, n)).equals(fleetBytes), `${n}'s target is the image`);
      const views = await Promise.all(nodes.map((n) => api.getDeployment(n)));
      const seeders = views.filter((v) => v.peers?.seeder).length;
      // The seeder flag is the last poll's; once a disk is complete it is no longer one.
      assert.ok(seeders <= 1, `${seeders} seeders`);
      const data = dataBytes(disks[0]!.region_size);
      const fromPeers = disks.reduce((n, d) => n + d.peers.bytes_from_peers, 0);
      const fromOrigin = slow.stats.bytesSent - sent;
      // One copy of the image's data from the origin (plus the probes), three from peers.
      assert.ok(fromOrigin < data + 64 * 1024, `the origin sent ${fromOrigin} bytes for the fleet; one copy is ${data}`);
      assert.equal(fromPeers, 3 * data, `from peers: ${disks.map((d) => d.peers.bytes_from_peers).join(', ')}`);
      for (const d of disks) assert.equal(d.integrity_failures, 0);
      for (const n of nodes) await api.deleteDeployment(n);
      for (const n of nodes) await deploymentGone(api, n);
    } finally {
      await slow.stop();
    }
  });

  it('seeder slots: the first disks of an image take them, a withdrawn seeder frees its slot, none while a complete disk is listed', async () => {
    const r = new Redis(redis.url);
    try {
      const cfg = { enabled: true, max_peers: 8, announce_ttl_ms: 60_000, seed_time_ms: 3_600_000, seeders: 2, origin_wait_ms: 30_000 };
      const t = new PeerTracker(r, 'slots', cfg);
      const other = new PeerTracker(r, 'slots', cfg); // a second driver process on the same Redis
      const key = 'raw:1048576:sha512:abc';
      const got = await Promise.all(['d1', 'd2', 'd3', 'd4'].map((d, i) => (i % 2 ? other : t).seeder(key, d, false)));
      assert.equal(got.filter(Boolean).length, 2, `two seeders of four: ${got.join(', ')}`);
      const seeder = ['d1', 'd2', 'd3', 'd4'][got.indexOf(true)]!;
      const waiting = ['d1', 'd2', 'd3', 'd4'][got.indexOf(false)]!;
      assert.equal(await t.seeder(key, seeder, false), true, 'a seeder stays one at its next poll');
      await t.withdraw(key, seeder);
      assert.equal(await t.seeder(key, waiting, false), true, 'its slot goes to the next disk that polls');
      assert.equal(await t.seeder(key, waiting, true), false, 'a complete disk is listed: no seeder is needed');
      assert.equal(await t.seeder(key, 'd9', true), false);
      // Both processes derive the same token for the image, another for another image.
      assert.equal(await t.token(key), await other.token(key));
      assert.notEqual(await t.token(key), await t.token('raw:1048576:sha512:abd'));
    } finally {
      r.disconnect();
    }
  });

  it('a seed whose agent died without a teardown is left out: the next disk of the image becomes a seeder and reads the origin at once', async () => {
    // Its own image and a third agent, killed once its disk is a seed (a node that dies:
    // no teardown withdraws it). The next disk's origin is held until its deployment shows
    // it a seeder, so what is checked is the driver's choice, not how fast it copied.
    const lostImage = path.join(dir, 'lost-seed.raw');
    makeImage(lostImage, IMAGE_BYTES, 37);
    const lostBytes = fs.readFileSync(lostImage);
    const held = new TestOrigin({ file: lostImage });
    const url = await held.start();
    const dying = await agentDaemon({ dir: path.join(dir, 'agent-dying') });
    await dying.start();
    try {
      const info = { image_os_hash_algo: 'sha512', image_os_hash_value: createHash('sha512').update(lostBytes).digest('hex') };
      await api.createDeployment({
        node_uuid: 'node-d1',
        instance_info: { image_source: url, ...info },
        driver_info: { smartnic_agent_url: dying.url, smartnic_target: path.join(dir, 'agent-dying', 'targets', 'node-d1.raw'), smartnic_require_verification: true },
      });
      await complete('node-d1');
      await until('node-d1 listed as a seed', async () => Date.parse((await api.getDeployment('node-d1')).peers?.listed_until ?? '') > Date.now() + 30 * 60_000);
      await dying.stop('SIGKILL');

      // Its second half (the probes of the image's size read its first bytes).
      held.hold(IMAGE_BYTES / 2, IMAGE_BYTES);
      await api.createDeployment({ ...request(1, 'node-d2', info), instance_info: { image_source: url, ...info } });
      const seeding = await until('node-d2 a seeder', async () => {
        const d = await api.getDeployment('node-d2');
        return d.peers?.seeder ? d : null;
      }, 60_000);
      assert.equal(seeding.state === 'complete', false);
      held.release();
      const second = await complete('node-d2');
      assert.ok(fs.readFileSync(target(1, 'node-d2')).equals(lostBytes));
      const disk = await agentApi(1).getDisk(second.disk_id);
      assert.equal(disk.peers.sources, 0, 'the dead seed is not listed');
      assert.equal(disk.peers.bytes_from_peers, 0);
      await api.deleteDeployment('node-d2');
      await deploymentGone(api, 'node-d2');
    } finally {
      await dying.stop();
      await held.stop();
    }
  });

  it('a seed that serves bytes failing verification is reported and withdrawn: the disk that caught it becomes a seeder, and no wrong byte lands', async () => {
    // Its own image; the seed's target is damaged behind its agent's back after it became a
    // seed (a failing SSD, a tampered file): it serves those bytes as the image's. The
    // origin holds the damaged region, so the second disk cannot finish before the driver
    // has acted on the report.
    const liarImage = path.join(dir, 'liar.raw');
    makeImage(liarImage, IMAGE_BYTES, 43);
    const liarBytes = fs.readFileSync(liarImage);
    const held = new TestOrigin({ file: liarImage });
    const url = await held.start();
    const info = { image_os_hash_algo: 'sha512', image_os_hash_value: createHash('sha512').update(liarBytes).digest('hex') };
    const req = (a: number, node: string): DeploymentCreate => ({ ...request(a, node, info), instance_info: { image_source: url, ...info } });
    try {
      await api.createDeployment({ ...req(0, 'node-l1'), driver_info: { ...req(0, 'node-l1').driver_info, smartnic_require_verification: true } });
      const seed = await complete('node-l1');
      await verified(0, seed.disk_id);
      await until('node-l1 listed as a seed', async () => Date.parse((await api.getDeployment('node-l1')).peers?.listed_until ?? '') > Date.now() + 30 * 60_000);
      const REGION = MiB;
      const fd = fs.openSync(target(0, 'node-l1'), 'r+');
      fs.writeSync(fd, Buffer.alloc(4096, 0xee), 0, 4096, 5 * REGION + 100);
      fs.closeSync(fd);

      held.hold(5 * REGION, 6 * REGION);
      await api.createDeployment(req(1, 'node-l2'));
      const seeding = await until('node-l2 a seeder', async () => {
        const d = await api.getDeployment('node-l2');
        return d.peers?.seeder ? d : null;
      }, 60_000);
      assert.notEqual(seeding.state, 'complete');
      held.release();
      const second = await complete('node-l2');
      assert.ok(fs.readFileSync(target(1, 'node-l2')).equals(liarBytes), 'no wrong byte: the target is the image');
      const disk = await agentApi(1).getDisk(second.disk_id);
      assert.equal(disk.integrity_failures, 1, 'the damaged region was caught');
      assert.equal(disk.peers.sources, 0, 'the driver took the seed out of its list');
      assert.ok(disk.peers.bytes_from_peers > 0, 'the rest came from the seed');
      // Out of the lists for every disk of the image.
      const r = new Redis(redis.url);
      try {
        const groups = (await r.keys('test:peers:*')).filter((k) => /^test:peers:[0-9a-f]{64}$/.test(k));
        const entries = (await Promise.all(groups.map((k) => r.hkeys(k)))).flat();
        assert.ok(entries.some((e) => e.startsWith('node-l2/')), `node-l2 is listed: ${entries.join(', ')}`);
        assert.ok(!entries.some((e) => e.startsWith('node-l1/')), `node-l1 is listed: ${entries.join(', ')}`);
      } finally {
        r.disconnect();
      }
      for (const n of ['node-l1', 'node-l2']) await api.deleteDeployment(n);
      for (const n of ['node-l1', 'node-l2']) await deploymentGone(api, n);
    } finally {
      await held.stop();
    }
  });

  it('seed probes: only complete disks other than the asker, with a driver-facing URL, each once per half lease across driver processes; a silent one is left out while its verdict lasts', async () => {
    const r = new Redis(redis.url);
    try {
      const cfg = { enabled: true, max_peers: 8, announce_ttl_ms: 600_000, seed_time_ms: 3_600_000, seeders: 1, origin_wait_ms: 30_000 };
      const t = new PeerTracker(r, 'probes', cfg);
      const other = new PeerTracker(r, 'probes', cfg);
      const key = 'raw:1048576:sha512:probe';
      const entry = (d: string, complete: boolean, agent = true) => ({ deployment: d, url: `http://${d}:9611`, ...(agent ? { agent: `http://${d}-mgmt:9611` } : {}), disk: d, rack: null, local: complete ? 4 : 1, total: 4, complete });
      for (const e of [entry('alive', true), entry('dead', true), entry('copying', false), entry('me', true), entry('old-driver', true, false)]) await t.announce(key, e);
      const probed: string[] = [];
      let deadAnswers = false;
      const answers = async (h: PeerHolder): Promise<boolean> => {
        probed.push(h.agent!);
        return !h.agent!.includes('dead') || deadAnswers;
      };
      const first = await t.liveHolders(key, await t.holders(key), 'me', answers);
      assert.deepEqual(probed.sort(), ['http://alive-mgmt:9611', 'http://dead-mgmt:9611'], 'the seeds but the asker and the one without a driver-facing URL, at that URL');
      assert.deepEqual(first.silent.map((h) => h.deployment), ['dead']);
      assert.deepEqual(first.live.map((h) => h.deployment).sort(), ['alive', 'copying', 'me', 'old-driver']);
      assert.equal((await t.holders(key)).length, 5, 'left out, not withdrawn');
      // While the verdicts last, no process probes those seeds again.
      probed.length = 0;
      const again = await other.liveHolders(key, await other.holders(key), 'copying', answers);
      assert.deepEqual(probed, ['http://me-mgmt:9611'], 'only the seed not probed yet');
      assert.deepEqual(again.silent.map((h) => h.deployment), ['dead']);
      // Its verdict gone (it lasts half a lease), the silent seed is probed again: it answers, it is back.
      const groups = (await r.keys('probes:peers:*:alive:dead'));
      assert.equal(groups.length, 1);
      await r.del(groups[0]!);
      deadAnswers = true;
      probed.length = 0;
      const back = await t.liveHolders(key, await t.holders(key), 'copying', answers);
      assert.deepEqual(probed, ['http://dead-mgmt:9611']);
      assert.deepEqual(back.silent, []);
    } finally {
      r.disconnect();
    }
  });

  it('a banned disk is not listed, also when it announces after the ban; the ban is reported once and expires', async () => {
    const r = new Redis(redis.url);
    try {
      const cfg = { enabled: true, max_peers: 8, announce_ttl_ms: 600_000, seed_time_ms: 3_600_000, seeders: 1, origin_wait_ms: 30_000 };
      const t = new PeerTracker(r, 'bans', cfg);
      const key = 'raw:1048576:sha512:ban';
      const e = { deployment: 'liar', url: 'http://liar:9611', disk: 'liar', rack: null, local: 4, total: 4, complete: true };
      assert.ok(await t.announce(key, e));
      assert.equal(await t.ban(key, 'liar'), true);
      assert.equal(await t.ban(key, 'liar'), false, 'reported once');
      assert.deepEqual(await t.holders(key), []);
      assert.equal(await t.announce(key, e), null, 'refused after the ban');
      assert.deepEqual(await t.holders(key), []);
      const bans = await r.keys('bans:peers:*:banned:liar');
      assert.equal(bans.length, 1);
      assert.ok((await r.pttl(bans[0]!)) > 0, 'the ban expires');
    } finally {
      r.disconnect();
    }
  });

  it('an image with nothing naming its content gets no peers, and the deployment says why', async () => {
    await api.createDeployment(request(1, 'node-p4', {}));
    const d = await deploymentIn(api, 'node-p4', ['ready', 'complete']);
    assert.equal(d.peers?.enabled, false);
    assert.match(d.peers?.note ?? '', /nothing names the image's content/);
    assert.equal((await agentApi(1).getDisk(d.disk_id)).peers.offered, false);
    await api.deleteDeployment('node-p4');
    await deploymentGone(api, 'node-p4');
  });

});

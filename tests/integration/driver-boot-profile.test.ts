/**
 * Boot profiles through the control plane, with real processes (redis-server, the DPU
 * agent daemon, the driver service, an HTTP origin) and qemu-io as the host: the first
 * deployment of an image records its host's boot and the monitor job stores it (also
 * after hydration has completed); the second deployment replays it — its regions become
 * local before any host read while the sequential sweep is held at the origin — and its
 * own boot is merged into the image's profile by the rule (mean rank, kept by ≥ min_share
 * of the boots); a profile the agent refuses is deleted and never fails the deployment;
 * a driver with boot profiles disabled neither records nor replays.
 *
 * A boot that the agent recorded after hydration completed before the host's first read
 * is collected by the teardown instead of a monitor job left polling.
 *
 * The agent's recording budget is 4 regions, so a recording ends when the host has read
 * four regions: no timing anywhere, every wait is for a state.
 */
import assert from 'node:assert/strict';
import path from 'node:path';
import { Redis } from 'ioredis';
import { AgentClient } from '../../openapi/clients/agent-client.js';
import { DriverClient, type DeploymentCreate } from '../../openapi/clients/driver-client.js';
import { ApiError } from '../../openapi/clients/http.js';
import { BootProfileStore, mergeBoots } from '../../driver/src/boot-profiles.js';
import { resolveDriverConfig } from '../../driver/src/config.js';
import { makeImage, tempDir } from '../helpers/agent.js';
import { TestOrigin } from '../helpers/origin.js';
import { RedisServer } from '../helpers/redis.js';
import { run } from '../helpers/run.js';
import { agentDaemon, deploymentGone, deploymentWhere, driverService, type ServiceProcess, TOKEN, until } from '../helpers/services.js';

const MiB = 1 << 20;
const REGION = 256 << 10;
const IMAGE_SIZE = 32 * MiB; // 128 regions

async function hostReads(uri: string, regions: number[]): Promise<void> {
  await run('qemu-io', ['-f', 'raw', uri, ...regions.flatMap((r) => ['-c', `read ${r * REGION + 4096} 4096`])]);
}

describe('driver service: boot profiles (record, merge, replay, refuse, disabled)', function () {
  this.timeout(120_000);
  let dir: string;
  let cleanup: () => void;
  let origin: TestOrigin;
  let redis: RedisServer;
  let agent: ServiceProcess;
  let driver: ServiceProcess;
  let offDriver: ServiceProcess;
  let api: DriverClient;
  let offApi: DriverClient;
  let agentApi: AgentClient;

  before(async () => {
    ({ dir, cleanup } = tempDir('driver-boot-profile'));
    const image = path.join(dir, 'image.raw');
    makeImage(image, IMAGE_SIZE, 31);
    origin = new TestOrigin({ file: image });
    await origin.start();
    redis = new RedisServer(path.join(dir, 'redis'));
    await redis.start();
    agent = await agentDaemon({ dir: path.join(dir, 'agent'), extra: { boot_profiles: { max_regions: 4, window_ms: 600_000 } } });
    await agent.start();
    agentApi = new AgentClient({ baseUrl: agent.url, token: TOKEN });
    // Manifests off: their build reads the whole image, which the replay test holds at the origin.
    driver = await driverService({ dir, redisUrl: redis.url, extra: { manifests: { enabled: false } } });
    await driver.start();
    api = new DriverClient({ baseUrl: driver.url, token: TOKEN });
    offDriver = await driverService({ dir, redisUrl: redis.url, extra: { redis: { url: redis.url, prefix: 'off' }, manifests: { enabled: false }, boot_profiles: { enabled: false } } });
    await offDriver.start();
    offApi = new DriverClient({ baseUrl: offDriver.url, token: TOKEN });
    await until('the drivers reach Redis', () => api.listDeployments().then(() => offApi.listDeployments()).then(() => true));
  });
  after(async () => {
    origin?.release();
    await driver?.stop();
    await offDriver?.stop();
    await agent?.stop();
    await redis?.stop();
    await origin?.stop();
    cleanup();
  });

  const target = (node: string): string => path.join(dir, 'agent', 'targets', `${node}.raw`);
  const request = (node: string): DeploymentCreate => ({
    node_uuid: node,
    instance_info: { image_source: origin.url, image_os_hash_algo: 'sha256', image_os_hash_value: 'ab'.repeat(32) },
    driver_info: { smartnic_agent_url: agent.url, smartnic_target: target(node), smartnic_region_size: REGION },
  });
  const teardown = async (client: DriverClient, node: string): Promise<void> => {
    await client.deleteDeployment(node);
    await deploymentGone(client, node);
  };
  let profileId = '';

  it('records the first deployment\'s boot and stores it; a disk complete mid-boot keeps the monitor polling for it', async () => {
    // Held so that the host starts booting while the disk still streams (the sweep stops in the first 16 MiB).
    origin.hold(0, 16 * MiB);
    await api.createDeployment(request('node-p1'));
    const ready = await deploymentWhere(api, 'node-p1', (d) => d.state === 'ready', 'ready');
    assert.ok(ready.boot_profile, 'the deployment reports boot profiles');
    assert.equal(ready.boot_profile.applied, false, 'no profile stored yet');
    assert.equal(ready.boot_profile.regions, 0);
    profileId = ready.boot_profile.id;
    await hostReads(ready.export_uri!, [100, 70, 120]);
    origin.release();
    const complete = await deploymentWhere(api, 'node-p1', (d) => d.state === 'complete' && d.boot_profile?.recording === 'recording', 'complete while recording');
    assert.equal(complete.boot_profile!.collected, false);
    assert.notEqual(complete.jobs.find((j) => j.queue === 'monitor')?.state, 'completed', 'the monitor waits for the recording');
    await hostReads(ready.export_uri!, [90]);
    const done = await deploymentWhere(api, 'node-p1', (d) => d.boot_profile?.collected === true, 'boot collected');
    assert.equal(done.boot_profile!.recording, 'done');
    const list = await api.listBootProfiles();
    assert.equal(list.length, 1);
    assert.equal(list[0]!.id, profileId);
    assert.equal(list[0]!.region_size, REGION);
    assert.match(list[0]!.key, /^v2;raw;262144;sha256=abab/);
    const p = await api.getBootProfile(profileId);
    assert.deepEqual(p.merged, [100, 70, 120, 90]);
    assert.equal(p.boots, 1);
    assert.equal(p.history[0]!.node, 'node-p1');
    await deploymentWhere(api, 'node-p1', (d) => d.jobs.find((j) => j.queue === 'monitor')?.state === 'completed', 'the monitor ended once the boot was stored');
    await teardown(api, 'node-p1');
  });

  it('replays it on the next deployment before any host read, and merges that boot by mean rank', async () => {
    // The sweep starts at region 0, two 8 MiB batches at a time: holding the first 16 MiB
    // stops it there. The profile's regions lie after: only the profile copies them.
    origin.hold(0, 16 * MiB);
    try {
      await api.createDeployment(request('node-p2'));
      const ready = await deploymentWhere(api, 'node-p2', (d) => d.state === 'ready', 'ready');
      assert.deepEqual({ ...ready.boot_profile, recording: undefined }, { id: profileId, applied: true, regions: 4, boots: 1, recording: undefined, collected: false, note: null });
      const disk = await until('the profile\'s regions local', async () => {
        const x = await agentApi.getDisk(ready.disk_id);
        return x.boot_profile.replay.local === 4 ? x : null;
      });
      assert.equal(disk.boot_profile.recording.state, 'waiting', 'no host read yet: the regions came from the profile');
      assert.equal(disk.boot_profile.replay.boots, 1);
      const states = decodeRle((await agentApi.regionMap(ready.disk_id)).map);
      for (const r of [100, 70, 120, 90]) assert.equal(states[r], 'L', `region ${r} local`);
      assert.ok(states.slice(0, 64).every((s) => s !== 'L'), 'the held sweep made nothing local');
      // This host reads in another order (and one other region): served locally where the profile was.
      await hostReads(ready.export_uri!, [70, 100, 110, 90]);
      await deploymentWhere(api, 'node-p2', (d) => d.boot_profile?.collected === true, 'boot collected');
    } finally {
      origin.release();
    }
    const p = await api.getBootProfile(profileId);
    assert.equal(p.boots, 2);
    // min_share 0.5 of 2 boots: a region read by either is kept. Mean ranks (position / (length - 1)):
    // 70 and 100 (0 + 1/3) / 2 each (tie: the lower region first), 110 and 120 2/3, 90 1.
    assert.deepEqual(p.merged, [70, 100, 110, 120, 90]);
    assert.deepEqual(p.merged, mergeBoots([[70, 100, 110, 90], [100, 70, 120, 90]], { minShare: 0.5, maxRegions: 4096 }));
    assert.deepEqual(p.history.map((h) => h.node), ['node-p2', 'node-p1'], 'newest first');
    await deploymentWhere(api, 'node-p2', (d) => d.state === 'complete', 'complete');
    await teardown(api, 'node-p2');
  });

  it('a profile the agent refuses (regions past the image) is deleted; the deployment goes on', async () => {
    const key = (await api.getBootProfile(profileId)).key;
    const deleted = await api.deleteBootProfile(profileId);
    assert.equal(deleted.boots, 2);
    await assert.rejects(api.getBootProfile(profileId), (e: unknown) => e instanceof ApiError && e.status === 404 && e.code === 'DRV_ERR_PROFILE_NOT_FOUND');
    await assert.rejects(api.deleteBootProfile(profileId), (e: unknown) => e instanceof ApiError && e.status === 404 && e.code === 'DRV_ERR_PROFILE_NOT_FOUND');
    // A profile of this image's key naming region 5000 (the image has 128): as if recorded for another image.
    const conn = new Redis(redis.url);
    try {
      const store = new BootProfileStore(conn, 'test', resolveDriverConfig({ object: { auth: { disabled: true } } }).boot_profiles);
      await store.push({ boot: 'hand/made/0', node: 'hand', key, region_size: REGION, recorded_at: new Date().toISOString(), regions: [3, 5000] });
    } finally {
      conn.disconnect();
    }
    assert.deepEqual((await api.getBootProfile(profileId)).merged, [3, 5000]);
    await api.createDeployment(request('node-p3'));
    const ready = await deploymentWhere(api, 'node-p3', (d) => d.state === 'ready' || d.state === 'complete', 'ready');
    assert.equal(ready.boot_profile!.applied, false);
    assert.match(ready.boot_profile!.note!, /DPU_ERR_PROFILE_INVALID.*region 5000.*deleted/);
    const disk = await agentApi.getDisk(ready.disk_id);
    assert.equal(disk.boot_profile.replay.state, 'refused');
    await assert.rejects(api.getBootProfile(profileId), (e: unknown) => e instanceof ApiError && e.status === 404, 'the refused profile is gone');
    let metrics = await api.metrics();
    assert.match(metrics, /smartnic_driver_boot_profiles_total\{event="applied"\} 1/);
    assert.match(metrics, /smartnic_driver_boot_profiles_total\{event="collected"\} 2/);
    assert.match(metrics, /smartnic_driver_boot_profiles_total\{event="refused"\} 1/);
    assert.match(metrics, /smartnic_driver_boot_profiles_stored 0/);
    // Hydration beat the power-on: the monitor does not stay for a host that has read nothing…
    await deploymentWhere(api, 'node-p3', (d) => d.state === 'complete' && d.jobs.find((j) => j.queue === 'monitor')?.state === 'completed', 'complete, monitor ended');
    assert.equal((await api.getDeployment('node-p3')).boot_profile!.recording, 'waiting');
    // …and the boot recorded afterwards is stored by the teardown.
    await hostReads(ready.export_uri!, [1, 2, 3, 4]);
    await until('the recording done', async () => (await agentApi.bootProfile(ready.disk_id)).state === 'done');
    await teardown(api, 'node-p3');
    const fresh = await api.getBootProfile(profileId);
    assert.deepEqual(fresh.merged, [1, 2, 3, 4]);
    assert.equal(fresh.history[0]!.node, 'node-p3');
    metrics = await api.metrics();
    assert.match(metrics, /smartnic_driver_boot_profiles_total\{event="collected"\} 3/);
    assert.match(metrics, /smartnic_driver_boot_profiles_stored 1/);
  });

  it('the store keeps each image apart and the last `history` entries of each (a boot stored twice counts once), skips entries that are not boot records, and renews an image\'s expiry with each boot', async () => {
    const conn = new Redis(redis.url);
    try {
      const cfg = { ...resolveDriverConfig({ object: { auth: { disabled: true } } }).boot_profiles, history: 3, min_share: 0, max_regions: 100 };
      const store = new BootProfileStore(conn, 'store-test', cfg);
      const keyA = 'v2;raw;262144;sha256=' + 'a'.repeat(64);
      const keyB = 'v2;raw;262144;sha256=' + 'b'.repeat(64);
      const boot = (key: string, n: number, regions: number[]) => ({ boot: `node-${n}/dep-${n}/2026-12-06T00:00:0${n}Z`, node: `node-${n}`, key, region_size: REGION, recorded_at: `2026-12-06T00:00:0${n}Z`, regions });
      for (let n = 1; n <= 4; n++) await store.push(boot(keyA, n, [n, 100 + n]));
      await store.push(boot(keyA, 4, [4, 104])); // the monitor stored boot 4 twice
      await store.push(boot(keyB, 1, [50, 51]));
      // Something else's entries in A's list: skipped, not fatal.
      for (const junk of ['not json {', 'null', '42', '{"boot": 7}']) await conn.lpush(`store-test:boot-profile:${(await store.forKey(keyA))!.id}`, junk);
      const a = (await store.forKey(keyA))!;
      const b = (await store.forKey(keyB))!;
      assert.equal(a.key, keyA);
      assert.equal(b.key, keyB);
      assert.notEqual(a.id, b.id);
      // history 3 is the list's last 3 entries: boot 4 (stored twice, counted once) and boot 3; boots 1 and 2 aged out.
      assert.deepEqual(a.history.map((h) => h.boot).sort(), [boot(keyA, 3, []).boot, boot(keyA, 4, []).boot].sort());
      assert.equal(a.boots, 2);
      assert.deepEqual([...a.merged].sort((x, y) => x - y), [3, 4, 103, 104]);
      assert.deepEqual(b.merged, [50, 51], "B's boots are B's alone");
      assert.equal(b.boots, 1);
      assert.equal(a.boots + b.boots, 3);
      const ttl = await conn.ttl(`store-test:boot-profile:${b.id}`);
      assert.ok(ttl > 0 && ttl <= cfg.ttl_days * 86_400, `the list expires ttl_days after its last boot (TTL ${ttl} s)`);
      // Each boot stored pushes the expiry out again.
      await conn.expire(`store-test:boot-profile:${b.id}`, 60);
      await store.push(boot(keyB, 2, [50, 52]));
      assert.ok((await conn.ttl(`store-test:boot-profile:${b.id}`)) > 60, 'the TTL is renewed by a new boot');
      assert.deepEqual((await store.list()).map((x) => x.id).sort(), [a.id, b.id].sort());
      // An expired list is dropped from the listing.
      await conn.del(`store-test:boot-profile:${b.id}`);
      assert.deepEqual((await store.list()).map((x) => x.id), [a.id]);
      assert.equal(await store.count(), 1);
    } finally {
      conn.disconnect();
    }
  });

  it('disabled: no recording on the agent, no profile replayed, nothing stored', async () => {
    await offApi.createDeployment(request('node-p4'));
    const ready = await deploymentWhere(offApi, 'node-p4', (d) => d.state === 'ready' || d.state === 'complete', 'ready');
    assert.equal(ready.boot_profile, null);
    const disk = await agentApi.getDisk(ready.disk_id);
    assert.equal(disk.boot_profile.recording.state, 'off');
    assert.equal(disk.boot_profile.replay.state, 'none');
    await hostReads(ready.export_uri!, [1, 2, 3, 4, 5]);
    assert.deepEqual((await agentApi.bootProfile(ready.disk_id)).regions, []);
    await deploymentWhere(offApi, 'node-p4', (d) => d.state === 'complete' && d.jobs.find((j) => j.queue === 'monitor')?.state === 'completed', 'complete, monitor ended');
    assert.deepEqual(await offApi.listBootProfiles(), []);
    await teardown(offApi, 'node-p4');
  });
});

function decodeRle(map: string): string[] {
  const out: string[] = [];
  for (const m of map.matchAll(/(\d+)([rzfL])/g)) for (let i = 0; i < Number(m[1]); i++) out.push(m[2]!);
  return out;
}

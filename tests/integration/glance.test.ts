/**
 * Images from Glance and Swift, end to end against the real services (Debian packages,
 * started by tests/helpers/openstack.ts): memcached, a single-node Swift with tempauth and
 * tempurl, Glance on its file store and Glance on the Swift store; with redis-server, the
 * DPU agent daemon and two driver services (one per Glance). A raw image deploys from
 * each store; on the Swift store the agent reads a temp URL signed as Ironic signs it,
 * which the driver renews during a long hydration; Swift objects deploy too; a missing
 * image fails cleanly. The Glance and Swift behaviour all this rests on (DESIGN.md §4) is
 * asserted first, so a package upgrade that changes it is caught by name.
 */
import assert from 'node:assert/strict';
import { createHash, randomBytes, randomUUID } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { tempUrl } from '../../driver/src/swift.js';
import { AgentClient } from '../../openapi/clients/agent-client.js';
import { DriverClient, type Deployment, type DeploymentCreate } from '../../openapi/clients/driver-client.js';
import { ApiError } from '../../openapi/clients/http.js';
import { tempDir } from '../helpers/agent.js';
import { type GlanceImage, OpenStack } from '../helpers/openstack.js';
import { RedisServer } from '../helpers/redis.js';
import { run } from '../helpers/run.js';
import { agentDaemon, driverService, type ServiceProcess, TOKEN, until } from '../helpers/services.js';

const MiB = 1 << 20;
const IMAGE_SIZE = 16 * MiB;
const TEMP_URL_KEY = 'test-temp-url-key';
/** Short enough that a bandwidth-capped hydration outlives the first temp URL. */
const TEMP_URL_SECONDS = 20;
/** A signature in clear: what must never reach a log or the API. */
const CLEAR_SIG = /temp_url_sig=[0-9a-f]{16}/;

describe('images from Glance and Swift (real Swift, Glance, agent and driver)', function () {
  this.timeout(180_000);
  let dir: string;
  let cleanup: () => void;
  let os: OpenStack;
  let image: Buffer;
  let imageFile: string;
  let onFile: GlanceImage;
  let onSwift: GlanceImage;
  let redis: RedisServer;
  let agent: ServiceProcess;
  let agentApi: AgentClient;
  let driverFile: ServiceProcess;
  let driverSwift: ServiceProcess;
  let fileApi: DriverClient;
  let swiftApi: DriverClient;

  before(async function () {
    this.timeout(120_000);
    ({ dir, cleanup } = tempDir('glance'));
    // Random bytes: no zero stretch that a manifest could let the agent skip, so the
    // capped hydration below takes as long as its size says.
    image = randomBytes(IMAGE_SIZE);
    imageFile = path.join(dir, 'image.raw');
    fs.writeFileSync(imageFile, image);
    os = await OpenStack.start(path.join(dir, 'openstack'));
    console.log(`      OpenStack started in ${os.timings['total']} ms: ${JSON.stringify(os.timings)}`);
    await os.swift.setTempUrlKey(TEMP_URL_KEY);
    onFile = await os.glance.file!.uploadImage(image, { name: 'raw-on-file' });
    onSwift = await os.glance.swift!.uploadImage(image, { name: 'raw-on-swift' });
    redis = new RedisServer(path.join(dir, 'redis'));
    await redis.start();
    agent = await agentDaemon({ dir: path.join(dir, 'agent'), extra: { log_level: 'info' } });
    await agent.start();
    agentApi = new AgentClient({ baseUrl: agent.url, token: TOKEN });
    // One driver per Glance (the service talks to one Glance), each on its own queues.
    driverFile = await driverService({ dir, redisUrl: redis.url, extra: { redis: { url: redis.url, prefix: 'gfile' }, glance: { url: os.glance.file!.url } } });
    driverSwift = await driverService({
      dir,
      redisUrl: redis.url,
      extra: {
        redis: { url: redis.url, prefix: 'gswift' },
        log_level: 'info',
        // swift_account is derived from the endpoint's /v1/AUTH_test, as documented.
        glance: { url: os.glance.swift!.url, swift_endpoint_url: os.swift.storageUrl, swift_temp_url_key: TEMP_URL_KEY, swift_temp_url_duration: TEMP_URL_SECONDS },
      },
    });
    await Promise.all([driverFile.start(), driverSwift.start()]);
    fileApi = new DriverClient({ baseUrl: driverFile.url, token: TOKEN });
    swiftApi = new DriverClient({ baseUrl: driverSwift.url, token: TOKEN });
  });
  after(async () => {
    await driverFile?.stop();
    await driverSwift?.stop();
    await agent?.stop();
    await redis?.stop();
    await os?.stop();
    cleanup?.();
  });

  const target = (node: string): string => path.join(dir, 'agent', 'targets', `${node}.raw`);
  const request = (node: string, imageSource: string, extra: Partial<DeploymentCreate['driver_info']> = {}): DeploymentCreate => ({
    node_uuid: node,
    instance_info: { image_source: imageSource },
    driver_info: { smartnic_agent_url: agent.url, smartnic_target: target(node), ...extra },
  });
  const state = (api: DriverClient, node: string, want: Deployment['state'][], timeoutMs = 60_000): Promise<Deployment> =>
    until(
      `${node} in ${want.join('/')}`,
      async () => {
        const d = await api.getDeployment(node);
        if (d.state === 'failed' && !want.includes('failed')) throw new Error(`deployment failed: ${d.last_error}`);
        return want.includes(d.state) ? d : null;
      },
      timeoutMs,
    );
  const tearDown = async (api: DriverClient, node: string): Promise<void> => {
    await api.deleteDeployment(node);
    await until(`${node} deleted`, async () => api.getDeployment(node).then(() => false, (e: unknown) => e instanceof ApiError && e.status === 404));
  };
  /** The URL the agent really reads (with its signature), from the disk's spec.json. */
  const agentSourceUrl = (diskId: string): string => (JSON.parse(fs.readFileSync(path.join(dir, 'agent', 'state', 'disks', diskId, 'spec.json'), 'utf8')) as { source: { url: string } }).source.url;
  const sha512 = (b: Buffer): string => createHash('sha512').update(b).digest('hex');

  describe('what Glance and Swift do (DESIGN.md §4), which the driver relies on', () => {
    it('Glance records size, sha512 os_hash, md5 checksum, and shows the store in locations', () => {
      for (const img of [onFile, onSwift]) {
        assert.equal(img.status, 'active');
        assert.equal(img.size, IMAGE_SIZE);
        assert.equal(img.os_hash_algo, 'sha512');
        assert.equal(img.os_hash_value, sha512(image));
        assert.equal(img.checksum, createHash('md5').update(image).digest('hex'));
      }
      assert.match(onFile.direct_url!, /^file:\/\//);
      assert.equal(onSwift.direct_url, `swift+config://ref1/glance/${onSwift.id}`);
    });

    it('Glance serves a single Range on the file store only; multi-range and HEAD are refused', async () => {
      const file = os.glance.file!;
      const r = await file.download(onFile.id, { Range: 'bytes=1000-1999' });
      assert.equal(r.status, 206);
      assert.equal(r.headers.get('content-range'), `bytes 1000-1999/${IMAGE_SIZE}`);
      assert.ok(r.body.equals(image.subarray(1000, 2000)));
      assert.equal((await file.download(onFile.id, { Range: 'bytes=0-9,20-29' })).status, 400, 'multi-range');
      assert.equal((await fetch(`${file.url}/v2/images/${onFile.id}/file`, { method: 'HEAD' })).status, 405, 'HEAD on /file');
      // The Swift store: every ranged download is a 400 — why the DPU reads Swift directly.
      assert.equal((await os.glance.swift!.download(onSwift.id, { Range: 'bytes=0-9' })).status, 400);
    });

    it('Swift: the image is a segmented object; a temp URL (no token) serves single ranges across segments', async () => {
      const head = await os.swift.request('HEAD', `glance/${onSwift.id}`);
      assert.equal(head.status, 200);
      assert.match(head.headers.get('x-object-manifest') ?? '', /^glance\//, 'Glance stored it as segments + manifest (DLO)');
      const t = tempUrl(
        { swift_endpoint_url: os.swift.url, swift_api_version: 'v1', swift_account: os.swift.account, swift_account_prefix: 'AUTH', swift_container: 'glance', swift_temp_url_key: TEMP_URL_KEY, swift_temp_url_duration: 60, swift_store_multiple_containers_seed: 0 },
        { container: 'glance', object: onSwift.id },
      );
      // The driver's signature is python-swiftclient's (what Ironic calls).
      assert.equal(t.url, await os.swift.swiftclientTempUrl(`/v1/${os.swift.account}/glance/${onSwift.id}`, t.expires, TEMP_URL_KEY));
      const boundary = 2 * MiB; // the first segment ends here (segments of 2 MiB)
      const res = await fetch(t.url, { headers: { Range: `bytes=${boundary - 100}-${boundary + 99}` } });
      assert.equal(res.status, 206);
      assert.equal(res.headers.get('content-range'), `bytes ${boundary - 100}-${boundary + 99}/${IMAGE_SIZE}`);
      assert.ok(Buffer.from(await res.arrayBuffer()).equals(image.subarray(boundary - 100, boundary + 100)));
      // A multi-range GET of a segmented object answers 200 with everything: the agent never asks for one.
      const multi = await fetch(t.url, { headers: { Range: 'bytes=0-9,20-29' } });
      assert.equal(multi.status, 200);
      assert.equal(Number(multi.headers.get('content-length')), IMAGE_SIZE);
      await multi.body?.cancel();
      // Change the signature's first digit (to a different one: setting it to '0' would be a
      // no-op for the one signature in sixteen that already starts with '0').
      const bad = await fetch(t.url.replace(/temp_url_sig=([0-9a-f])/, (_m, d: string) => `temp_url_sig=${d === '0' ? '1' : '0'}`));
      assert.equal(bad.status, 401, 'a wrong signature is refused');
      await bad.arrayBuffer();
    });
  });

  describe('deployments through the driver and the agent', () => {
    it('deploys a Glance image from the file store through Glance’s download URL', async () => {
      const v = await fileApi.validate(request('v-file', onFile.id));
      assert.equal(v.image_size, IMAGE_SIZE);
      const created = await fileApi.createDeployment(request('node-file', onFile.id));
      assert.equal(created.image_url, `glance://${onFile.id}`, 'before resolution: the Glance id');
      const ready = await state(fileApi, 'node-file', ['ready', 'complete']);
      assert.equal(ready.image_url, `${os.glance.file!.url}/v2/images/${onFile.id}/file`);
      assert.equal(ready.image_expires_at, null, 'a Glance download URL does not expire');
      const disk = await agentApi.getDisk(ready.disk_id);
      assert.equal(disk.source.identity, `glance:${onFile.id};sha512=${onFile.os_hash_value}`);
      assert.match((await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', imageFile, ready.export_uri!])).stdout, /identical/, 'the export serves the image');
      const done = await state(fileApi, 'node-file', ['complete']);
      assert.equal(done.progress.fraction, 1);
      assert.ok(fs.readFileSync(target('node-file')).equals(image), 'the target is the image');
      await tearDown(fileApi, 'node-file');
    });

    it('deploys a Glance image from the Swift store through a temp URL, signature never shown', async () => {
      const v = await swiftApi.validate(request('v-swift', `glance://${onSwift.id}`));
      assert.equal(v.image_size, IMAGE_SIZE);
      const asked = Math.floor(Date.now() / 1000);
      await swiftApi.createDeployment(request('node-swift', `glance://${onSwift.id}`));
      const ready = await state(swiftApi, 'node-swift', ['ready', 'complete']);
      const answered = Math.floor(Date.now() / 1000);
      const shown = new URL(ready.image_url);
      assert.equal(`${shown.origin}${shown.pathname}`, `${os.swift.storageUrl}/glance/${onSwift.id}`);
      assert.equal(shown.searchParams.get('temp_url_sig'), 'REDACTED');
      const expires = Number(shown.searchParams.get('temp_url_expires'));
      // Signed between the request and the answer (bracketed, not compared with a tolerance).
      assert.ok(expires >= asked + TEMP_URL_SECONDS && expires <= answered + TEMP_URL_SECONDS, `expires ${expires}, signed between ${asked} and ${answered} + ${TEMP_URL_SECONDS}`);
      assert.equal(ready.image_expires_at, new Date(expires * 1000).toISOString());
      // The agent got the real temp URL, signed exactly as python-swiftclient signs it.
      const real = agentSourceUrl(ready.disk_id);
      assert.equal(real, await os.swift.swiftclientTempUrl(`/v1/${os.swift.account}/glance/${onSwift.id}`, expires, TEMP_URL_KEY));
      const disk = await agentApi.getDisk(ready.disk_id);
      assert.equal(disk.source.identity, `glance:${onSwift.id};sha512=${onSwift.os_hash_value}`);
      assert.match(disk.source.url, /temp_url_sig=REDACTED/);
      assert.match((await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', imageFile, ready.export_uri!])).stdout, /identical/, 'the export serves the image');
      await state(swiftApi, 'node-swift', ['complete']);
      assert.ok(fs.readFileSync(target('node-swift')).equals(image));
      await tearDown(swiftApi, 'node-swift');
      for (const [name, svc] of [['driver', driverSwift], ['agent', agent]] as const) {
        assert.ok(svc.output.length > 0, `${name} logged something`);
        assert.doesNotMatch(svc.output, CLEAR_SIG, `${name}'s log shows no signature`);
      }
      assert.match(driverSwift.output, /streaming disk ready.*temp_url_sig=REDACTED|temp_url_sig=REDACTED.*streaming disk ready/);
    });

    it('renews the temp URL during a long hydration; the agent switches to it and completes', async () => {
      // The copy is held (paused on the agent) until the first URL (20 s) has expired and the
      // agent restarted, so it is provably still running then; capped at 640 KiB/s (~26 s for
      // the image) so that the pause comes long before it could have finished.
      await swiftApi.createDeployment(request('node-renew', onSwift.id, { smartnic_bandwidth: 640 * 1024 }));
      const ready = await state(swiftApi, 'node-renew', ['ready']);
      const held = await agentApi.updateHydration(ready.disk_id, { paused: true });
      assert.notEqual(held.state, 'complete', 'the copy was paused before it finished');
      const firstUrl = agentSourceUrl(ready.disk_id);
      const firstExpiry = ready.image_expires_at!;
      // The agent refuses a "renewal" that names another image.
      await assert.rejects(agentApi.updateSource(ready.disk_id, { url: firstUrl, identity: 'glance:another;sha512=00' }), (e: unknown) => e instanceof ApiError && e.status === 409 && e.code === 'DPU_ERR_SOURCE_MISMATCH');
      const renewed = await until('the temp URL renewed', async () => {
        const d = await swiftApi.getDeployment('node-renew');
        if (d.state !== 'ready') throw new Error(`state ${d.state} before the renewal: ${d.last_error}`);
        return d.image_expires_at !== firstExpiry ? d : null;
      }, TEMP_URL_SECONDS * 1000);
      // When the renewal was signed, from the URLs themselves (not from when this test noticed it).
      const signedAt = Date.parse(renewed.image_expires_at!) / 1000 - TEMP_URL_SECONDS;
      const left = Date.parse(firstExpiry) / 1000 - signedAt;
      assert.ok(left > 0 && left <= TEMP_URL_SECONDS / 3 + 1, `renewed with ${left} s of ${TEMP_URL_SECONDS} left`);
      assert.ok(Date.parse(renewed.image_expires_at!) > Date.parse(firstExpiry));
      assert.match(renewed.image_url, new RegExp(`temp_url_expires=${Date.parse(renewed.image_expires_at!) / 1000}$`));
      assert.doesNotMatch(renewed.image_url, CLEAR_SIG);
      const secondUrl = agentSourceUrl(ready.disk_id);
      assert.notEqual(secondUrl, firstUrl, "the agent's spec.json holds the new URL (a restart uses it)");
      assert.match((await agentApi.getDisk(ready.disk_id)).source.url, new RegExp(`temp_url_expires=${Date.parse(renewed.image_expires_at!) / 1000}`));
      // Past the first URL's expiry, a restarted agent re-opens the disk with the URL its
      // spec.json holds — the new one — and hydration goes on through it.
      await until('the first URL expired', async () => Date.now() > Date.parse(firstExpiry) + 500, TEMP_URL_SECONDS * 1000);
      assert.equal((await agentApi.getDisk(ready.disk_id)).hydration.state, 'paused', 'still hydrating (held) when the first URL expired');
      await agent.stop('SIGKILL');
      await agent.start();
      await agentApi.updateHydration(ready.disk_id, { paused: false, bandwidth: 0 });
      const done = await state(swiftApi, 'node-renew', ['complete'], 60_000);
      const old = await fetch(firstUrl, { headers: { Range: 'bytes=0-0' } });
      assert.equal(old.status, 401, 'the first URL has expired');
      await old.arrayBuffer();
      assert.equal(done.progress.fraction, 1);
      assert.ok(fs.readFileSync(target('node-renew')).equals(image));
      assert.match(driverSwift.output, /image URL renewed/);
      assert.doesNotMatch(driverSwift.output + agent.output, CLEAR_SIG, 'no signature in the logs of the renewal');
      await tearDown(swiftApi, 'node-renew');
    });

    it('deploys a Swift object, given as swift://container/object or as its URL', async () => {
      await os.swift.putObject('images', 'dir/raw image.img', image);
      const objectUrl = `${os.swift.storageUrl}/images/dir/raw%20image.img`;
      // Unsigned, the URL is refused by Swift; the driver signs it.
      assert.equal((await fetch(objectUrl)).status, 401);
      assert.equal((await swiftApi.validate(request('v-obj', objectUrl))).image_size, IMAGE_SIZE);
      await swiftApi.createDeployment(request('node-obj', 'swift://images/dir/raw image.img'));
      const done = await state(swiftApi, 'node-obj', ['complete']);
      assert.match(done.image_url, /\/v1\/AUTH_test\/images\/dir\/raw%20image\.img\?temp_url_sig=REDACTED&temp_url_expires=\d+$/);
      const disk = (await agentApi.listDisks()).find((d) => d.id === done.disk_id)!;
      assert.match(disk.source.identity!, /^swift:\/v1\/AUTH_test\/images\/dir\/raw image\.img;etag=[0-9a-f]{32}$/);
      assert.ok(fs.readFileSync(target('node-obj')).equals(image));
      await tearDown(swiftApi, 'node-obj');
    });

    it('a missing Glance image: validate refuses it, a deployment fails at once with a clear last_error', async () => {
      const missing = randomUUID();
      await assert.rejects(fileApi.validate(request('v-missing', missing)), (e: unknown) => e instanceof ApiError && e.status === 422 && e.code === 'DRV_ERR_IMAGE_NOT_FOUND');
      await fileApi.createDeployment(request('node-missing', missing));
      const d = await state(fileApi, 'node-missing', ['failed'], 30_000);
      assert.equal(d.last_error, `DRV_ERR_IMAGE_NOT_FOUND: the image does not exist: Glance at ${os.glance.file!.url} has no image ${missing}`);
      const attach = d.jobs.find((j) => j.queue === 'attach')!;
      assert.equal(attach.attempts, 1, 'a missing image is not retried');
      assert.equal((await agentApi.listDisks()).filter((x) => x.id === d.disk_id).length, 0, 'no disk was created');
      await tearDown(fileApi, 'node-missing');
    });

    it('refuses malformed or unconfigured sources when the deployment is created', async () => {
      const refused = async (api: DriverClient, source: string, pattern: RegExp): Promise<void> => {
        await assert.rejects(api.createDeployment(request('node-bad', source)), (e: unknown) => e instanceof ApiError && e.status === 422 && e.code === 'DRV_ERR_IMAGE_SOURCE' && pattern.test(e.message));
      };
      await refused(fileApi, 'glance://not-a-uuid', /does not end in a Glance image id/);
      await refused(swiftApi, 'swift://only-a-container', /is not swift:\/\/container\/object/);
      await refused(fileApi, 'swift://c/o', /no glance\.swift_endpoint_url configured/);
      await refused(fileApi, 'ftp://example/x.img', /scheme "ftp:" is not supported/);
      await assert.rejects(fileApi.getDeployment('node-bad'), (e: unknown) => e instanceof ApiError && e.status === 404);
    });
  });
});

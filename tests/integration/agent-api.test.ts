/**
 * The agent daemon's management API, driven with the typed AgentClient against a real
 * origin and real NBD clients: in-process (buildAgentApi over a real socket, responses
 * checked strictly against openapi/dpu-agent.yaml), then as a real `dpu-agent serve`
 * process for SIGTERM and kill -9 restarts.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { Writable } from 'node:stream';
import { pino } from 'pino';
import type { FastifyInstance } from 'fastify';
import { AgentClient, type Disk, type DiskCreate } from '../../openapi/clients/agent-client.js';
import { ApiError } from '../../openapi/clients/http.js';
import { buildAgentApi } from '../../dpu-agent/src/daemon/api.js';
import { parseAgentConfig } from '../../dpu-agent/src/daemon/config.js';
import { DiskManager } from '../../dpu-agent/src/daemon/disks.js';
import { RegionMap } from '../../dpu-agent/src/region/region-map.js';
import { Manifest } from '../../image-access/src/manifest.js';
import type { DpuError } from '../../image-access/src/errors.js';
import { FileSource } from '../helpers/qcow2-images.js';
import { makeImage, tempDir } from '../helpers/agent.js';
import { DaemonProcess } from '../helpers/daemon.js';
import { TestOrigin } from '../helpers/origin.js';
import { run } from '../helpers/run.js';

const MiB = 1 << 20;
const KiB = 1 << 10;
const IMAGE_SIZE = 24 * MiB;
const REGION = 256 * KiB;
const REGIONS = IMAGE_SIZE / REGION;
const TOKEN = 'test-token-0123456789abcdef';
const SOURCE_SECRET = 'origin-secret-5f4dcc3b5aa765d61d83';

async function until<T>(what: string, fn: () => Promise<T | undefined | false>, timeoutMs = 30_000, everyMs = 100): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, everyMs));
  }
}

async function rejects(p: Promise<unknown>, status: number, code: string, field?: string): Promise<ApiError> {
  try {
    await p;
  } catch (err) {
    assert.ok(err instanceof ApiError, `an ApiError, not ${String(err)}`);
    assert.equal(err.status, status, err.message);
    assert.equal(err.code, code, err.message);
    assert.equal(typeof err.retryable, 'boolean');
    if (field !== undefined) assert.equal(err.field, field, err.message);
    return err;
  }
  throw new Error(`expected HTTP ${status} ${code}`);
}

/** A raw request, for what the typed client hides (the status of a success, unknown routes). */
async function raw(base: string, method: string, route: string, body?: unknown, token: string | null = TOKEN): Promise<{ status: number; json: Record<string, unknown> }> {
  const res = await fetch(base + route, {
    method,
    headers: { ...(token ? { authorization: `Bearer ${token}` } : {}), ...(body !== undefined ? { 'content-type': 'application/json' } : {}) },
    ...(body !== undefined ? { body: JSON.stringify(body) } : {}),
  });
  return { status: res.status, json: (await res.json()) as Record<string, unknown> };
}

function waitState(client: AgentClient, id: string, state: Disk['state'], timeoutMs = 30_000): Promise<Disk> {
  return until(`disk ${id} ${state}`, async () => {
    const d = await client.getDisk(id);
    return d.state === state ? d : undefined;
  }, timeoutMs);
}

describe('agent daemon API (in-process)', function () {
  this.timeout(60_000);
  let dir: string;
  let cleanup: () => void;
  let image: string;
  let origin: TestOrigin;
  let manager: DiskManager;
  let app: FastifyInstance;
  let base: string;
  let client: AgentClient;
  const logText: string[] = [];
  const responses: unknown[] = [];
  let targets: string;
  let exportDir: string;
  let stateDir: string;

  const body = (id: string, over: Partial<DiskCreate> = {}): DiskCreate => ({
    id,
    source: { url: `${origin.url}?temp_url_sig=sig-${SOURCE_SECRET}&temp_url_expires=1795000000`, headers: { 'X-Auth-Token': SOURCE_SECRET }, identity: 'image-1' },
    target: { path: path.join(targets, `${id}.raw`) },
    region_size: REGION,
    ...over,
  });

  before(async () => {
    ({ dir, cleanup } = tempDir('agent-api'));
    image = path.join(dir, 'image.raw');
    makeImage(image, IMAGE_SIZE, 11);
    origin = new TestOrigin({ file: image });
    await origin.start();
    targets = path.join(dir, 'targets') + '/';
    exportDir = path.join(dir, 'run');
    stateDir = path.join(dir, 'state');
    const config = parseAgentConfig(
      {
        auth: { tokens: [TOKEN] },
        state_dir: stateDir,
        export_dir: exportDir,
        allowed_targets: [targets],
        reopen_interval_ms: 500,
        defaults: { commit_interval_ms: 200, open_timeout_ms: 2000 },
        log_level: 'debug',
      },
      'test config',
    );
    const sink = new Writable({
      write(chunk: Buffer, _enc, cb) {
        logText.push(chunk.toString());
        cb();
      },
    });
    const log = pino({ level: 'debug' }, sink);
    manager = new DiskManager({ config, log });
    await manager.start();
    app = buildAgentApi({ config, manager, log, responseValidation: 'strict' });
    base = await app.listen({ port: 0, host: '127.0.0.1' });
    client = new AgentClient({ baseUrl: base, token: TOKEN });
  });

  after(async () => {
    await app?.close();
    await manager?.close();
    await origin?.stop();
    cleanup?.();
  });

  it('answers health without a token', async () => {
    const h = await new AgentClient({ baseUrl: base }).health();
    assert.equal(h.status, 'ok');
    assert.equal(h.disks, 0);
    assert.match(h.version, /^\d+\.\d+\.\d+/);
  });

  it('refuses a missing or wrong token with 401 and an Error body', async () => {
    const e1 = await rejects(new AgentClient({ baseUrl: base }).listDisks(), 401, 'DPU_ERR_UNAUTHORIZED');
    assert.equal(e1.retryable, false);
    await rejects(new AgentClient({ baseUrl: base, token: 'wrong-token-wrong-token' }).listDisks(), 401, 'DPU_ERR_UNAUTHORIZED');
    await rejects(new AgentClient({ baseUrl: base }).createDisk(body('noauth')), 401, 'DPU_ERR_UNAUTHORIZED');
    const r = await raw(base, 'GET', '/v1/disks', undefined, null);
    assert.deepEqual(Object.keys(r.json).sort(), ['code', 'message', 'retryable']);
  });

  it('creates a disk (201) whose export serves the image, and which completes to a target equal to it', async () => {
    const created = await raw(base, 'POST', '/v1/disks', body('alpha', { hydration: { bandwidth: 4 * MiB } }));
    assert.equal(created.status, 201, JSON.stringify(created.json));
    const d = created.json as unknown as Disk;
    responses.push(d);
    assert.equal(d.id, 'alpha');
    assert.ok(d.state === 'streaming' || d.state === 'complete');
    assert.equal(d.size, IMAGE_SIZE);
    assert.equal(d.region_size, REGION);
    assert.equal(d.regions.total, REGIONS);
    assert.equal(d.source.identity, 'image-1');
    assert.match(d.source.url, /temp_url_sig=REDACTED/);
    assert.equal(d.export.socket, path.join(exportDir, 'alpha.sock'));
    assert.equal(d.export.name, 'disk');
    assert.equal(d.hydration.bandwidth, 4 * MiB);
    assert.ok(fs.existsSync(d.export.socket!), 'the export is listening when the response is sent');
    assert.equal(fs.statSync(path.join(stateDir, 'disks', 'alpha', 'spec.json')).mode & 0o777, 0o600);

    await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', image, d.export.uri]);
    // The empty export name selects the disk too.
    await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', image, `nbd+unix:///?socket=${d.export.socket!}`]);

    const mid = await client.getDisk('alpha');
    responses.push(mid);
    assert.ok(mid.bytes_fetched > 0);
    assert.ok(mid.regions.local > 0);
    assert.ok(mid.fetch_rate_bps >= 0);
    const done = await waitState(client, 'alpha', 'complete');
    responses.push(done);
    assert.equal(done.regions.local, REGIONS);
    assert.equal(done.hydration.state, 'complete');
    assert.equal(done.last_error, null);
    assert.ok(fs.readFileSync(path.join(targets, 'alpha.raw')).equals(fs.readFileSync(image)), 'target = image');
  });

  it('serves peer agents the verified image bytes of a disk offered with peers.token, and nothing else', async () => {
    const PEER_TOKEN = 'peer-token-for-image-1-9f86d081884c';
    const peerGet = (id: string, range: string | null, token: string | null = PEER_TOKEN) =>
      fetch(`${base}/v1/disks/${id}/image`, { headers: { ...(token ? { authorization: `Bearer ${token}` } : {}), ...(range ? { range } : {}) } });
    const refused = async (res: Response, status: number, code: string): Promise<void> => {
      assert.equal(res.status, status);
      assert.equal(((await res.json()) as { code: string }).code, code);
    };
    const created = await client.createDisk(body('peer-a', { peers: { token: PEER_TOKEN }, hydration: { paused: true } }));
    assert.deepEqual(created.peers, { offered: true, bytes_served: 0, sources: 0, excluded: 0, excluded_sources: [], bytes_from_peers: 0, fallbacks: 0, fallback_causes: { busy: 0, refused: 0, failed: 0 } });
    await refused(await peerGet('peer-a', `bytes=0-${REGION - 1}`), 409, 'DPU_ERR_NOT_SERVABLE'); // remote
    const manifest = await Manifest.build(new FileSource(image), { regionSize: REGION });
    await client.setManifest('peer-a', manifest.encode());
    await client.updateHydration('peer-a', { paused: false });
    const done = await waitState(client, 'peer-a', 'complete');
    assert.equal(done.verified, true);
    const img = fs.readFileSync(image);
    const res = await peerGet('peer-a', `bytes=${REGION}-${3 * REGION - 1}`);
    assert.equal(res.status, 206);
    assert.equal(res.headers.get('content-range'), `bytes ${REGION}-${3 * REGION - 1}/${IMAGE_SIZE}`);
    assert.ok(Buffer.from(await res.arrayBuffer()).equals(img.subarray(REGION, 3 * REGION)), 'the image bytes');
    // Serving slots (peers.max_inflight 2) and the queue behind them (peers.max_queued 8):
    // a released slot goes to the oldest waiting read; past the queue, 503 at once.
    const ask = (): ReturnType<DiskManager['readForPeer']> => manager.readForPeer('peer-a', `Bearer ${PEER_TOKEN}`, `bytes=${REGION}-${REGION + 99}`);
    const holding = [await ask(), await ask()];
    const granted: number[] = [];
    const queued = Array.from({ length: 8 }, (_, i) => ask().then((r) => (granted.push(i), r)));
    await assert.rejects(ask(), (err: DpuError) => err.code === 'DPU_ERR_BUSY' && /max_queued/.test(err.message));
    // Over HTTP the same refusal is a 503 DPU_ERR_BUSY. It is flow control between peers, not
    // a failure: logged at debug and without a stack (a fleet's seeder refuses many a second;
    // logged as errors they cost it CPU and buried its real errors).
    // (Its log lines are checked once the queue has drained: its reads give up after 2 s.)
    const logged = logText.length;
    await refused(await peerGet('peer-a', `bytes=${REGION}-${REGION + 99}`), 503, 'DPU_ERR_BUSY');
    holding[0]!.release();
    holding[0]!.release(); // once only: the second call gives nothing away
    holding[0]!.sent();
    holding[0]!.sent(); // counted once only
    const first = await queued[0]!;
    assert.deepEqual(granted, [0], 'the oldest waiting read, and only it');
    assert.ok(first.data.equals(img.subarray(REGION, REGION + 100)));
    // Each sent (as the API counts an answer once it has gone out whole), then released.
    const served = (r: Awaited<ReturnType<DiskManager['readForPeer']>>): void => {
      r.sent();
      r.release();
    };
    // One slot freed at a time, so that the read it goes to is the only one that can end
    // (with two freed together, the two reads granted race each other to the target and
    // end in either order: a clean-clone CI run saw 6 before 5).
    const results = [first];
    served(holding[1]!);
    for (let i = 1; i < 8; i++) {
      results.push(await Promise.race(queued.slice(i)));
      assert.deepEqual(granted, [...Array(i + 1).keys()], 'first come, first served: a freed slot goes to the oldest waiting read');
      served(results[i - 1]!);
    }
    served(results[7]!);
    const busyLines = (): Array<{ level: number }> =>
      logText.slice(logged).join('').split('\n').filter((l) => l.includes('"status":503') || l.includes('DPU_ERR_BUSY')).map((l) => JSON.parse(l) as { level: number });
    await until('the busy refusal logged', async () => busyLines().some((l) => JSON.stringify(l).includes('"status":503')));
    for (const l of busyLines()) {
      assert.equal(l.level, 20, `a busy refusal is logged at debug: ${JSON.stringify(l)}`);
      assert.ok(!JSON.stringify(l).includes('"stack"'), 'without a stack');
    }
    // A peer that goes away while its read waits for a slot leaves no slot taken.
    const hold = [await ask(), await ask()];
    const gone = net.connect(Number(new URL(base).port), '127.0.0.1');
    gone.write(`GET /v1/disks/peer-a/image HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${PEER_TOKEN}\r\nRange: bytes=0-99\r\n\r\n`);
    await until('the read queued', async () => manager.peerServing().queued === 1);
    gone.destroy();
    await new Promise((r) => gone.once('close', r));
    for (const h of hold) served(h);
    await until('every slot free', async () => manager.peerServing().inflight === 0 && manager.peerServing().queued === 0, 10_000);
    const regions = async (): Promise<{ runs: number[]; complete: boolean }> => (await fetch(`${base}/v1/disks/peer-a/image/regions`, { headers: { authorization: `Bearer ${PEER_TOKEN}` } })).json() as Promise<{ runs: number[]; complete: boolean }>;
    assert.equal((await regions()).complete, true, 'complete and verified: what it serves can only shrink');
    await refused(await peerGet('peer-a', 'bytes=0-99', 'wrong-token-0123456789abcdef'), 401, 'DPU_ERR_UNAUTHORIZED');
    await refused(await peerGet('peer-a', 'bytes=0-99', TOKEN), 401, 'DPU_ERR_UNAUTHORIZED'); // the API's token is not a peer token
    await refused(await peerGet('peer-a', 'bytes=0-99', null), 401, 'DPU_ERR_UNAUTHORIZED');
    for (const range of [null, 'bytes=0-', 'bytes=5-1', 'bytes=0-1,4-5', `bytes=0-${IMAGE_SIZE}`, `bytes=0-${(16 << 20)}`]) {
      await refused(await peerGet('peer-a', range), 416, 'DPU_ERR_RANGE');
    }
    await client.createDisk(body('peer-b', { hydration: { paused: true } }));
    await refused(await peerGet('peer-b', 'bytes=0-99'), 401, 'DPU_ERR_UNAUTHORIZED'); // not offered: the same answer as a wrong token
    assert.equal((await client.getDisk('peer-b')).peers.offered, false);
    await client.deleteDisk('peer-b', true);
    await refused(await peerGet('no-such-disk', 'bytes=0-99'), 401, 'DPU_ERR_UNAUTHORIZED'); // nothing learnt without the token
    // The host writes into region 0: its bytes are the host's, never served to peers again.
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x55 4096 4096', done.export.uri]);
    await refused(await peerGet('peer-a', 'bytes=0-99'), 409, 'DPU_ERR_NOT_SERVABLE');
    await refused(await peerGet('peer-a', `bytes=${REGION - 1}-${REGION}`), 409, 'DPU_ERR_NOT_SERVABLE');
    assert.equal((await peerGet('peer-a', `bytes=${REGION}-${REGION + 99}`)).status, 206, 'the next region still is');
    const after = await regions();
    assert.equal(after.runs[0], 1, 'region 0 is no longer served');
    assert.equal(after.complete, false, 'it no longer serves every region');
    const view = await client.getDisk('peer-a');
    // The ranges above, the ten of the queue, the two held in the gone peer's case: not
    // the gone peer's own read, made once a slot was free but never sent.
    assert.equal(view.peers.bytes_served, 2 * REGION + 100 + 12 * 100);
    assert.ok(!JSON.stringify(await client.listDisks()).includes(PEER_TOKEN), 'the token is never shown');
    assert.ok(!logText.join('').includes(PEER_TOKEN), 'nor logged');
    await client.deleteDisk('peer-a', true);
  });

  it('reads a disk\'s image from a peer agent first: verified there, not from the origin; a peer whose bytes fail verification is not asked again', async () => {
    const PEER_TOKEN = 'peer-token-for-image-1-2c26b46b68ff';
    const manifest = (await Manifest.build(new FileSource(image), { regionSize: REGION })).encode();
    const img = fs.readFileSync(image);
    await client.createDisk(body('seed', { peers: { token: PEER_TOKEN } }));
    await client.setManifest('seed', manifest);
    assert.equal((await waitState(client, 'seed', 'complete')).verified, true);
    await client.createDisk(body('tokenless', { hydration: { paused: true } }));
    await rejects(client.setPeers('tokenless', { sources: [{ url: base, disk: 'seed' }] }), 409, 'DPU_ERR_PEER_REFUSED');
    await client.deleteDisk('tokenless', true);
    await rejects(client.setPeers('seed', { sources: [{ url: 'ftp://x', disk: 'seed' }] }), 400, 'DPU_ERR_BAD_REQUEST');

    const leech = async (id: string, over: Partial<DiskCreate> = {}, withManifest = true): Promise<Disk> => {
      await client.createDisk(body(id, { peers: { token: PEER_TOKEN }, hydration: { paused: true }, ...over }));
      if (withManifest) await client.setManifest(id, manifest);
      const listed = await client.setPeers(id, { sources: [{ url: base, disk: 'seed' }] });
      assert.equal(listed.peers.sources, 1);
      await client.updateHydration(id, { paused: false });
      const done = await waitState(client, id, 'complete');
      assert.ok(fs.readFileSync(path.join(targets, `${id}.raw`)).subarray(0, IMAGE_SIZE).equals(img), `${id}'s target is the image`);
      return done;
    };
    const sentBefore = origin.stats.bytesSent;
    const a = await leech('leech-a');
    // Every region but the image's zero ones (the manifest says so: never fetched at all).
    let dataBytes = 0;
    for (let r = 0; r < REGIONS; r++) if (img.subarray(r * REGION, (r + 1) * REGION).some((x) => x !== 0)) dataBytes += REGION;
    assert.ok(dataBytes > 0 && dataBytes < IMAGE_SIZE);
    // Two background reads at a time against peers.max_inflight 2: none is refused. A read
    // that stalls 5 s (a machine overloaded for that long) goes to the origin instead.
    if (a.peers.fallbacks === 0) assert.equal(a.peers.bytes_from_peers, dataBytes, `every region from the peer: ${JSON.stringify(a.peers)}`);
    else assert.ok(a.peers.bytes_from_peers > 0, JSON.stringify(a.peers));
    assert.equal(a.peers.excluded, 0);
    assert.equal(a.integrity_failures, 0);
    if (a.peers.fallbacks === 0) assert.ok(origin.stats.bytesSent - sentBefore <= IMAGE_SIZE / 8, `the origin sent ${origin.stats.bytesSent - sentBefore} bytes (the open's probe only)`);
    assert.equal((await client.getDisk('seed')).peers.bytes_served, a.peers.bytes_from_peers);
    // A root disk larger than the image reads the image's regions from the same peer.
    const big = await leech('leech-big', { size: IMAGE_SIZE + 4 * MiB });
    assert.ok(big.peers.bytes_from_peers > 0 && big.peers.bytes_from_peers <= dataBytes, JSON.stringify(big.peers));
    // Without a manifest nothing could check what a peer sends: the origin alone.
    const unchecked = await leech('leech-unchecked', {}, false);
    assert.equal(unchecked.peers.bytes_from_peers, 0);

    // The seed's target is damaged behind its back (a failing SSD, a tampered file): it
    // serves the bytes as the image's. The leech's verification catches them.
    const fd = fs.openSync(path.join(targets, 'seed.raw'), 'r+');
    fs.writeSync(fd, Buffer.alloc(4096, 0xee), 0, 4096, 5 * REGION + 100);
    fs.closeSync(fd);
    const b = await leech('leech-b');
    assert.equal(b.peers.excluded, 1, 'the lying peer is dropped');
    assert.deepEqual(b.peers.excluded_sources, [{ url: base, disk: 'seed' }], 'and named, for the driver to withdraw it');
    assert.equal(b.integrity_failures, 1);
    assert.equal(b.regions.failed, 0, "the peer's bad bytes do not count against the origin");
    for (const id of ['seed', 'leech-a', 'leech-b', 'leech-big', 'leech-unchecked']) await client.deleteDisk(id, true);
  });

  it('hydration.await_manifest_ms holds the background copy until the manifest is uploaded, hydration is resumed, or that long has passed', async () => {
    const manifest = (await Manifest.build(new FileSource(image), { regionSize: REGION })).encode();
    const held = await client.createDisk(body('held', { hydration: { await_manifest_ms: 600_000 } }));
    assert.equal(held.hydration.state, 'paused', 'held for its manifest');
    assert.equal(held.bytes_fetched, 0);
    // The manifest starts it (else it would wait ten minutes, past this test's deadline).
    await client.setManifest('held', manifest);
    assert.equal((await waitState(client, 'held', 'complete')).integrity_failures, 0);
    // A resume starts it at once.
    await client.createDisk(body('held-resumed', { hydration: { await_manifest_ms: 600_000 } }));
    await client.updateHydration('held-resumed', { paused: false });
    await waitState(client, 'held-resumed', 'complete');
    // No manifest within the wait: it copies unverified from the origin.
    await client.createDisk(body('held-short', { hydration: { await_manifest_ms: 200 } }));
    assert.equal((await waitState(client, 'held-short', 'complete')).manifest, false);
    // Too late for a manifest now: the source is dropped, so a region failing the check
    // could not be fetched again (it was made remote, and the host's reads of it failed).
    await rejects(client.setManifest('held-short', manifest), 409, 'DPU_ERR_DISK_COMPLETE');
    const after = await client.getDisk('held-short');
    assert.equal(after.state, 'complete');
    assert.equal(after.manifest, false);
    assert.equal(after.regions.local + after.regions.zero, after.regions.total, 'every region still local');
    // Paused at creation stays paused when the wait ends.
    const paused = await client.createDisk(body('held-paused', { hydration: { await_manifest_ms: 200, paused: true } }));
    await client.setManifest('held-paused', manifest);
    assert.equal((await client.getDisk('held-paused')).hydration.state, 'paused');
    assert.equal(paused.bytes_fetched, 0);
    for (const id of ['held', 'held-resumed', 'held-short', 'held-paused']) await client.deleteDisk(id, true);
  });

  it('is idempotent on id: the same body answers 200, another source 409', async () => {
    const again = await raw(base, 'POST', '/v1/disks', body('alpha', { hydration: { bandwidth: 4 * MiB } }));
    assert.equal(again.status, 200);
    assert.equal(again.json['id'], 'alpha');
    const other = body('alpha');
    await rejects(client.createDisk({ ...other, source: { ...other.source, identity: 'image-2' } }), 409, 'DPU_ERR_DISK_EXISTS');
    await rejects(client.createDisk({ ...other, id: 'alpha-2' }), 409, 'DPU_ERR_TARGET_IN_USE', 'target.path');
  });

  it('refuses bad bodies with 400 naming the field', async () => {
    const good = body('bad');
    const cases: [string, unknown, string, string][] = [
      ['unknown field', { ...good, colour: 'red' }, 'DPU_ERR_BAD_REQUEST', 'colour'],
      ['unknown nested field', { ...good, target: { path: good.target.path, mode: 'x' } }, 'DPU_ERR_BAD_REQUEST', 'target.mode'],
      ['missing source.url', { ...good, source: {} }, 'DPU_ERR_BAD_REQUEST', 'source.url'],
      ['url not http(s)', { ...good, source: { url: 'ftp://origin/image.raw' } }, 'DPU_ERR_BAD_REQUEST', 'source.url'],
      ['bad id pattern', { ...good, id: 'Not_Lower' }, 'DPU_ERR_BAD_REQUEST', 'id'],
      ['wrong type', { ...good, region_size: '1M' }, 'DPU_ERR_BAD_REQUEST', 'region_size'],
      ['region size not a power of two', { ...good, region_size: 3 * 65536 }, 'DPU_ERR_BAD_REQUEST', 'region_size'],
      ['target outside allowed_targets', { ...good, target: { path: '/etc/passwd' } }, 'DPU_ERR_TARGET_NOT_ALLOWED', 'target.path'],
      ['target escaping with ..', { ...good, target: { path: `${targets}../escape.raw` } }, 'DPU_ERR_TARGET_NOT_ALLOWED', 'target.path'],
      ['relative target', { ...good, target: { path: 'targets/bad.raw' } }, 'DPU_ERR_BAD_REQUEST', 'target.path'],
      ['tcp export not allowed', { ...good, export: { kind: 'tcp' } }, 'DPU_ERR_TCP_EXPORT_NOT_ALLOWED', 'export.kind'],
    ];
    for (const [what, b, code, field] of cases) {
      const r = await raw(base, 'POST', '/v1/disks', b);
      assert.equal(r.status, 400, `${what}: ${JSON.stringify(r.json)}`);
      assert.equal(r.json['code'], code, what);
      assert.equal(r.json['field'], field, `${what}: ${String(r.json['message'])}`);
      assert.equal(r.json['retryable'], false, what);
      assert.match(String(r.json['message']), new RegExp(field.split('.').pop()!), `${what}: the message names the field`);
    }
    await rejects(client.getDisk('Bad_Id'), 400, 'DPU_ERR_BAD_REQUEST', 'id');
    await rejects(client.updateHydration('alpha', {}), 400, 'DPU_ERR_BAD_REQUEST');
    await rejects(client.updateHydration('alpha', { bandwidth: -1 }), 400, 'DPU_ERR_BAD_REQUEST', 'bandwidth');
    const list = await client.listDisks();
    assert.deepEqual(list.map((d) => d.id), ['alpha'], 'no disk was created by a refused request');
    assert.ok(!fs.existsSync(path.join(stateDir, 'disks', 'bad')));
  });

  it('pauses, resumes and caps hydration; lists disks; serves the region map as RLE', async () => {
    const created = await client.createDisk(body('beta', { hydration: { bandwidth: 2 * MiB } }));
    assert.equal(created.hydration.state, 'running');
    await until('some regions local', async () => (await client.getDisk('beta')).regions.local >= 4);
    const paused = await client.updateHydration('beta', { paused: true });
    assert.equal(paused.hydration.state, 'paused');
    // Batches in flight finish; then nothing more is fetched.
    let last = -1;
    const settled = await until('fetching to stop', async () => {
      const d = await client.getDisk('beta');
      const same = d.bytes_fetched === last;
      last = d.bytes_fetched;
      return same ? d : undefined;
    }, 10_000, 400);
    await new Promise((r) => setTimeout(r, 1000));
    const still = await client.getDisk('beta');
    assert.equal(still.bytes_fetched, settled.bytes_fetched, 'paused: bytes_fetched does not grow');
    assert.equal(still.hydration.state, 'paused');
    assert.ok(still.regions.local < REGIONS);

    const map = await client.regionMap('beta');
    assert.equal(map.encoding, 'rle');
    assert.equal(map.count, REGIONS);
    assert.equal(map.region_size, REGION);
    assert.match(map.map, /^(\d+[rzfL])+$/);
    const runs = [...map.map.matchAll(/(\d+)([rzfL])/g)];
    assert.equal(runs.reduce((n, m) => n + Number(m[1]), 0), map.count, 'the runs add up to the region count');
    assert.equal(runs.filter((m) => m[2] === 'L').reduce((n, m) => n + Number(m[1]), 0), still.regions.local);

    const listed = await client.listDisks();
    assert.deepEqual(listed.map((d) => d.id).sort(), ['alpha', 'beta']);
    responses.push(listed, map);

    const capped = await client.updateHydration('beta', { bandwidth: 8 * MiB });
    assert.equal(capped.hydration.bandwidth, 8 * MiB);
    assert.equal(capped.hydration.state, 'paused', 'a bandwidth change alone does not resume');
    const resumed = await client.updateHydration('beta', { paused: false, bandwidth: 0 });
    assert.equal(resumed.hydration.state, 'running');
    assert.equal(resumed.hydration.bandwidth, 0);
    const spec = JSON.parse(fs.readFileSync(path.join(stateDir, 'disks', 'beta', 'spec.json'), 'utf8')) as { hydration: unknown };
    assert.deepEqual(spec.hydration, { enabled: true, paused: false, bandwidth: 0 }, 'the change is kept for a restart');
    const done = await waitState(client, 'beta', 'complete');
    assert.ok(fs.readFileSync(path.join(targets, 'beta.raw')).equals(fs.readFileSync(image)));
    responses.push(done);
  });

  it('exposes per-disk metrics', async () => {
    const text = await client.metrics();
    assert.match(text, /^dpu_agent_regions_local\{disk="alpha"\} 96$/m);
    assert.match(text, /^dpu_agent_regions_total\{disk="beta"\} 96$/m);
    assert.match(text, /^dpu_agent_complete\{disk="alpha"\} 1$/m);
    assert.match(text, /^dpu_agent_bytes_fetched\{disk="beta"\} \d+$/m);
    assert.match(text, /^dpu_agent_hydration_running\{disk="beta"\} 0$/m);
    assert.match(text, /^dpu_agent_process_cpu_seconds_total /m);
    // (AgentClient.metrics asks for text, so it cannot read the Error body: look at it raw.)
    const r = await raw(base, 'GET', '/metrics', undefined, null);
    assert.equal(r.status, 401);
    assert.equal(r.json['code'], 'DPU_ERR_UNAUTHORIZED');
  });

  it('deletes with wipe: the export, the target and the state are gone', async () => {
    const target = path.join(targets, 'alpha.raw');
    const sock = path.join(exportDir, 'alpha.sock');
    assert.ok(fs.existsSync(target) && fs.existsSync(sock));
    const last = await client.deleteDisk('alpha', true);
    assert.equal(last.id, 'alpha');
    assert.equal(last.state, 'complete');
    assert.ok(!fs.existsSync(sock), 'socket removed');
    assert.ok(!fs.existsSync(target), 'target file removed');
    assert.ok(!fs.existsSync(path.join(stateDir, 'disks', 'alpha')), 'state directory removed');
    await rejects(client.getDisk('alpha'), 404, 'DPU_ERR_NOT_FOUND');
    await rejects(client.deleteDisk('alpha', false), 404, 'DPU_ERR_NOT_FOUND');
    // Without wipe the target stays.
    await client.deleteDisk('beta', false);
    assert.ok(fs.existsSync(path.join(targets, 'beta.raw')));
    assert.deepEqual(await client.listDisks(), []);
  });

  it('answers 404 for unknown disks and routes in the Error shape', async () => {
    await rejects(client.getDisk('nope'), 404, 'DPU_ERR_NOT_FOUND');
    await rejects(client.regionMap('nope'), 404, 'DPU_ERR_NOT_FOUND');
    await rejects(client.updateHydration('nope', { paused: true }), 404, 'DPU_ERR_NOT_FOUND');
    const r = await raw(base, 'GET', '/v2/elsewhere');
    assert.equal(r.status, 404);
    assert.equal(r.json['code'], 'DPU_ERR_NOT_FOUND');
    assert.equal(r.json['retryable'], false);
  });

  it('with TCP exports allowed and auth disabled: a TCP export on a kept port; hydration disabled until resumed', async () => {
    const config = parseAgentConfig(
      { auth: { disabled: true }, state_dir: path.join(dir, 'state-tcp'), export_dir: path.join(dir, 'run-tcp'), allowed_targets: [targets], tcp_exports_allowed: true },
      'tcp config',
    );
    const log = pino({ level: 'silent' });
    const m2 = new DiskManager({ config, log });
    await m2.start();
    const app2 = buildAgentApi({ config, manager: m2, log, responseValidation: 'strict' });
    try {
      const c2 = new AgentClient({ baseUrl: await app2.listen({ port: 0, host: '127.0.0.1' }) });
      const d = await c2.createDisk(body('tcp', { export: { kind: 'tcp', name: 'boot' }, hydration: { enabled: false } }));
      assert.ok(d.export.port! > 0);
      assert.equal(d.export.uri, `nbd://127.0.0.1:${d.export.port!}/boot`);
      assert.equal(d.hydration.state, 'disabled');
      const spec = JSON.parse(fs.readFileSync(path.join(dir, 'state-tcp', 'disks', 'tcp', 'spec.json'), 'utf8')) as { export: { port: number } };
      assert.equal(spec.export.port, d.export.port, 'the port is kept for a restart');
      const info = await run('nbdinfo', ['--size', d.export.uri]);
      assert.equal(Number(info.stdout.trim()), IMAGE_SIZE);
      await new Promise((r) => setTimeout(r, 300));
      assert.equal((await c2.getDisk('tcp')).bytes_fetched, 0, 'nothing fetched while hydration is disabled');
      assert.equal((await c2.updateHydration('tcp', { paused: false })).hydration.state, 'running');
      await waitState(c2, 'tcp', 'complete');
      await c2.deleteDisk('tcp', true);
      assert.ok(!fs.existsSync(path.join(targets, 'tcp.raw')));
    } finally {
      await app2.close();
      await m2.close();
    }
  });

  it('never returns or logs source headers, signatures or API tokens', () => {
    const all = JSON.stringify(responses) + logText.join('');
    assert.ok(logText.length > 0);
    assert.ok(!all.includes(SOURCE_SECRET), 'the source secret leaked');
    assert.ok(!all.includes(TOKEN), 'the API token leaked');
  });
});

/** Makes a directory immutable (chattr +i) or not: even root can then not remove a file in it. */
async function immutable(dir: string, on: boolean): Promise<void> {
  await run('chattr', [on ? '+i' : '-i', dir]);
}

describe('agent daemon: a wipe that fails is kept, shown and retried', function () {
  // The fault: a file target in a directory made immutable, so the agent's own wipe of a
  // file target (removing it) fails with EPERM, as a failing device would fail its wipe.
  this.timeout(60_000);
  let dir: string;
  let cleanup: () => void;
  let origin: TestOrigin;
  let targets: string;
  let stateDir: string;
  let exportDir: string;
  let manager: DiskManager | null = null;
  let app: FastifyInstance | null = null;
  let client: AgentClient;

  const start = async (): Promise<void> => {
    const config = parseAgentConfig(
      { auth: { tokens: [TOKEN] }, state_dir: stateDir, export_dir: exportDir, allowed_targets: [targets], defaults: { commit_interval_ms: 200, open_timeout_ms: 2000 } },
      'wipe test config',
    );
    const log = pino({ level: 'silent' });
    manager = new DiskManager({ config, log });
    await manager.start();
    app = buildAgentApi({ config, manager, log, responseValidation: 'strict' });
    client = new AgentClient({ baseUrl: await app.listen({ port: 0, host: '127.0.0.1' }), token: TOKEN });
  };
  const stop = async (): Promise<void> => {
    await app?.close();
    await manager?.close();
    app = null;
    manager = null;
  };
  const create = (id: string): Promise<Disk> =>
    client.createDisk({ id, source: { url: origin.url, identity: 'image-w' }, target: { path: path.join(targets, `${id}.raw`) }, region_size: REGION });
  const stateOf = (id: string): string => path.join(stateDir, 'disks', id);

  before(async () => {
    ({ dir, cleanup } = tempDir('agent-wipe'));
    const image = path.join(dir, 'image.raw');
    makeImage(image, IMAGE_SIZE, 13);
    origin = new TestOrigin({ file: image });
    await origin.start();
    targets = path.join(dir, 'targets') + '/';
    fs.mkdirSync(targets);
    stateDir = path.join(dir, 'state');
    exportDir = path.join(dir, 'run');
    await start();
  });

  after(async () => {
    await immutable(targets, false).catch(() => undefined);
    await stop();
    await origin?.stop();
    cleanup?.();
  });

  it('DELETE whose wipe fails answers 500 DPU_ERR_WIPE_FAILED and keeps the disk, state wiping, until a DELETE wipes it', async () => {
    await create('eps');
    await waitState(client, 'eps', 'complete');
    const target = path.join(targets, 'eps.raw');
    await immutable(targets, true);
    try {
      const err = await rejects(client.deleteDisk('eps', true), 500, 'DPU_ERR_WIPE_FAILED');
      assert.equal(err.retryable, true);
      const d = await client.getDisk('eps');
      assert.equal(d.state, 'wiping');
      assert.match(d.last_error ?? '', /not permitted/);
      assert.equal(d.hydration.state, 'stopped');
      assert.deepEqual((await client.listDisks()).map((x) => [x.id, x.state]), [['eps', 'wiping']]);
      assert.ok(fs.existsSync(target), 'the target is not wiped');
      assert.ok(!fs.existsSync(path.join(exportDir, 'eps.sock')), 'no longer exported');
      assert.ok(!fs.existsSync(path.join(stateOf('eps'), 'regions.map')), 'no region map is left over data about to be wiped');
      assert.ok(fs.existsSync(path.join(stateOf('eps'), 'spec.json')), 'the pending wipe is on disk');
      // Nothing else may use the disk or its target meanwhile.
      await rejects(create('eps'), 409, 'DPU_ERR_DISK_WIPING');
      await rejects(client.createDisk({ id: 'other', source: { url: origin.url, identity: 'image-w' }, target: { path: target }, region_size: REGION }), 409, 'DPU_ERR_DISK_WIPING');
      await rejects(client.updateHydration('eps', { paused: false }), 409, 'DPU_ERR_DISK_WIPING');
      await rejects(client.regionMap('eps'), 409, 'DPU_ERR_DISK_WIPING');
      // A repeated DELETE retries the wipe, and fails again while the fault lasts.
      await rejects(client.deleteDisk('eps', true), 500, 'DPU_ERR_WIPE_FAILED');
      assert.equal((await client.getDisk('eps')).state, 'wiping');
    } finally {
      await immutable(targets, false);
    }
    const last = await client.deleteDisk('eps', true);
    assert.equal(last.id, 'eps');
    assert.ok(!fs.existsSync(target), 'wiped');
    assert.ok(!fs.existsSync(stateOf('eps')), 'state directory removed');
    await rejects(client.getDisk('eps'), 404, 'DPU_ERR_NOT_FOUND');
    await rejects(client.deleteDisk('eps', true), 404, 'DPU_ERR_NOT_FOUND');
  });

  it('a pending wipe survives a restart: listed wiping, not exported; a DELETE without wipe still wipes', async () => {
    await create('zeta');
    const target = path.join(targets, 'zeta.raw');
    await immutable(targets, true);
    try {
      await rejects(client.deleteDisk('zeta', true), 500, 'DPU_ERR_WIPE_FAILED');
      await stop();
      await start(); // tries the wipe again at start-up: it fails again
      const d = await client.getDisk('zeta');
      assert.equal(d.state, 'wiping');
      assert.match(d.last_error ?? '', /not permitted/);
      assert.ok(!fs.existsSync(path.join(exportDir, 'zeta.sock')), 'a disk waiting for its wipe is not exported again');
      assert.ok(fs.existsSync(target));
    } finally {
      await immutable(targets, false);
    }
    // A wipe once asked for is not cancelled by a DELETE that does not ask for one.
    await client.deleteDisk('zeta', false);
    assert.ok(!fs.existsSync(target), 'wiped');
    await rejects(client.getDisk('zeta'), 404, 'DPU_ERR_NOT_FOUND');
  });

  it('a restart after the fault cleared finishes the pending wipe by itself', async () => {
    await create('eta');
    const target = path.join(targets, 'eta.raw');
    await immutable(targets, true);
    try {
      await rejects(client.deleteDisk('eta', true), 500, 'DPU_ERR_WIPE_FAILED');
      await stop();
    } finally {
      await immutable(targets, false);
    }
    await start();
    assert.ok(!fs.existsSync(target), 'wiped at start-up');
    assert.ok(!fs.existsSync(stateOf('eta')));
    await rejects(client.getDisk('eta'), 404, 'DPU_ERR_NOT_FOUND');
    assert.deepEqual(await client.listDisks(), []);
  });
});

describe('agent daemon process: restart after SIGTERM and after kill -9', function () {
  this.timeout(90_000);
  let dir: string;
  let cleanup: () => void;
  let image: string;
  let origin: TestOrigin;
  let configFile: string;
  let stateDir: string;
  let targets: string;
  const daemons: DaemonProcess[] = [];

  const start = async (): Promise<{ daemon: DaemonProcess; client: AgentClient }> => {
    const daemon = new DaemonProcess(configFile);
    daemons.push(daemon);
    const url = await daemon.listening();
    return { daemon, client: new AgentClient({ baseUrl: url, token: TOKEN }) };
  };

  /** What the persisted region map says is local (read while no daemon runs). */
  const persistedLocal = (id: string): number => {
    const map = RegionMap.open(path.join(stateDir, 'disks', id), { diskSize: IMAGE_SIZE, regionSize: REGION, identity: `image-${id}` });
    try {
      return map.local;
    } finally {
      map.close();
    }
  };

  const create = (client: AgentClient, id: string): Promise<Disk> =>
    client.createDisk({
      id,
      source: { url: origin.url, identity: `image-${id}` },
      target: { path: path.join(targets, `${id}.raw`) },
      region_size: REGION,
      hydration: { bandwidth: 4 * MiB },
    });

  before(async () => {
    ({ dir, cleanup } = tempDir('agent-daemon'));
    image = path.join(dir, 'image.raw');
    makeImage(image, IMAGE_SIZE, 12);
    origin = new TestOrigin({ file: image });
    await origin.start();
    stateDir = path.join(dir, 'state');
    targets = path.join(dir, 'targets') + '/';
    const tokenFile = path.join(dir, 'tokens');
    fs.writeFileSync(tokenFile, `# API tokens\n${TOKEN}\n`, { mode: 0o600 });
    configFile = path.join(dir, 'agent.yaml');
    fs.writeFileSync(
      configFile,
      [
        'listen: { host: 127.0.0.1, port: 0 }',
        `auth: { token_file: ${tokenFile} }`,
        `state_dir: ${stateDir}`,
        `export_dir: ${path.join(dir, 'run')}`,
        `allowed_targets: [${targets}]`,
        'reopen_interval_ms: 500',
        'defaults: { commit_interval_ms: 200, open_timeout_ms: 1000 }',
        'log_level: warn',
        '',
      ].join('\n'),
    );
  });

  after(async () => {
    for (const d of daemons) await d.kill();
    await origin?.stop();
    cleanup?.();
  });

  it('refuses to start without an API token', async () => {
    const bare = path.join(dir, 'bare.yaml');
    fs.writeFileSync(bare, `state_dir: ${stateDir}\n`);
    const d = new DaemonProcess(bare);
    daemons.push(d);
    assert.equal(await d.exitCode(), 2);
    assert.match(d.stderr, /DPU_ERR_CONFIG.*auth\.tokens/);
  });

  it('SIGTERM mid-hydration, restart: the disk is listed again and completes without re-fetching local regions', async () => {
    const a = await start();
    await create(a.client, 'gamma');
    await until('hydration under way', async () => (await a.client.getDisk('gamma')).regions.local >= 12);
    assert.equal(await a.daemon.stop(), 0, a.daemon.stderr);
    assert.deepEqual(a.daemon.events().map((e) => e['event']), ['listening', 'stopped']);
    const local = persistedLocal('gamma');
    assert.ok(local >= 12 && local < REGIONS, `stopped mid-hydration with ${local} regions committed`);

    const sentBefore = origin.stats.bytesSent;
    const b = await start();
    const listed = await b.client.listDisks();
    assert.deepEqual(listed.map((d) => d.id), ['gamma']);
    assert.ok(listed[0]!.regions.local >= local);
    await b.client.updateHydration('gamma', { bandwidth: 0 });
    const done = await waitState(b.client, 'gamma', 'complete');
    assert.equal(origin.stats.bytesSent - sentBefore, (REGIONS - local) * REGION, 'only the regions not yet local were fetched');
    assert.equal(done.bytes_fetched, (REGIONS - local) * REGION);
    assert.ok(fs.readFileSync(path.join(targets, 'gamma.raw')).equals(fs.readFileSync(image)));
    // A complete disk is resumed without its origin, and keeps serving.
    assert.equal(await b.daemon.stop(), 0);
  });

  it('kill -9 mid-hydration, restart with the origin down: listed failed, then opens and completes', async () => {
    const a = await start();
    assert.equal((await a.client.getDisk('gamma')).state, 'complete');
    await create(a.client, 'delta');
    await until('hydration under way', async () => (await a.client.getDisk('delta')).regions.local >= 12);
    await a.daemon.kill();
    const local = persistedLocal('delta');
    assert.ok(local < REGIONS, `killed mid-hydration (${local} regions committed)`);

    origin.setDown(true);
    const b = await start();
    const failed = await b.client.getDisk('delta');
    assert.equal(failed.state, 'failed');
    assert.equal(failed.hydration.state, 'stopped');
    assert.ok(failed.last_error, 'last_error says why');
    assert.equal(failed.size, IMAGE_SIZE, 'geometry from the disk record');
    await rejects(b.client.regionMap('delta'), 409, 'DPU_ERR_DISK_FAILED');
    assert.equal((await b.client.getDisk('gamma')).state, 'complete', 'a complete disk needs no origin');

    const sentBefore = origin.stats.bytesSent;
    origin.setDown(false);
    await until('the disk to open', async () => (await b.client.getDisk('delta')).state !== 'failed', 10_000);
    await b.client.updateHydration('delta', { bandwidth: 0 });
    const done = await waitState(b.client, 'delta', 'complete');
    assert.equal(done.last_error, null);
    assert.equal(origin.stats.bytesSent - sentBefore, (REGIONS - local) * REGION, 'only regions the map did not say local were fetched');
    assert.ok(fs.readFileSync(path.join(targets, 'delta.raw')).equals(fs.readFileSync(image)));
    await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', image, done.export.uri]);
    assert.equal(await b.daemon.stop(), 0);
  });
});

/**
 * Serving peers yields to the host (peers.host_yield_ms; dpu-agent/src/block/host-activity.ts,
 * dpu-agent/src/daemon/send-pacer.ts), with real processes: an agent daemon holding a
 * complete disk offered to peers and a second disk that a host reads through its NBD
 * export with qemu-io, and an HTTP origin that holds that disk's range request back (a
 * controllable origin), so the host's read stays in flight for as long as the test wants.
 * Nothing waits on time: the test waits for the origin to hold the read and for the
 * agent's counter of held peer reads, and checks what happened before and after the
 * host's read ends. How much the host gains is a benchmark's business (bench/peer-serve.ts).
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { Manifest } from '../../image-access/src/manifest.js';
import { AgentClient } from '../../openapi/clients/agent-client.js';
import { makeImage, tempDir } from '../helpers/agent.js';
import { TestOrigin } from '../helpers/origin.js';
import { FileSource } from '../helpers/qcow2-images.js';
import { run } from '../helpers/run.js';
import { agentDaemon, type ServiceProcess, TOKEN, until } from '../helpers/services.js';

const MiB = 1 << 20;
const IMAGE_BYTES = 8 * MiB;
const PEER_TOKEN = 'peer-token-for-the-priority-test';

describe('serving peers yields to the host (peers.host_yield_ms)', function () {
  this.timeout(120_000);
  let dir: string;
  let cleanup: () => void;
  let image: string;
  let imageBytes: Buffer;
  let origin: TestOrigin;
  const agents: ServiceProcess[] = [];

  before(() => {
    ({ dir, cleanup } = tempDir('peer-serve-priority'));
    image = path.join(dir, 'image.raw');
    makeImage(image, IMAGE_BYTES, 41);
    imageBytes = fs.readFileSync(image);
  });
  beforeEach(async () => {
    origin = new TestOrigin({ file: image });
    await origin.start();
  });
  afterEach(async () => {
    origin.release();
    for (const a of agents.splice(0)) await a.stop();
    await origin.stop();
  });
  after(() => cleanup());

  /** An agent with a complete, verified disk `seed` offered to peers, and a disk `host` a host reads. */
  async function agentWith(name: string, holdMs: number): Promise<{ agent: ServiceProcess; api: AgentClient; hostUri: string }> {
    const agent = await agentDaemon({ dir: path.join(dir, name), extra: { peers: { host_yield_ms: holdMs } } });
    await agent.start();
    agents.push(agent);
    const api = new AgentClient({ baseUrl: agent.url, token: TOKEN });
    const target = (id: string): { path: string } => ({ path: path.join(dir, name, 'targets', `${id}.raw`) });
    await api.createDisk({ id: 'seed', source: { url: origin.url, identity: 'image' }, target: target('seed'), region_size: MiB, peers: { token: PEER_TOKEN }, hydration: { paused: true } });
    await api.setManifest('seed', (await Manifest.build(new FileSource(image), { regionSize: MiB })).encode());
    await api.updateHydration('seed', { paused: false });
    await until('seed complete and verified', async () => {
      const d = await api.getDisk('seed');
      return d.regions.local === d.regions.total && d.verified;
    }, 60_000);
    const host = await api.createDisk({ id: 'host', source: { url: origin.url, identity: 'image' }, target: target('host'), region_size: MiB, hydration: { paused: true } });
    return { agent, api, hostUri: host.export.uri };
  }

  /** The host reads 4 KiB that the origin holds back: in flight until `origin.release()`. */
  async function hostReadHeld(uri: string): Promise<{ done: () => boolean; result: Promise<unknown> }> {
    origin.hold(0, IMAGE_BYTES);
    let finished = false;
    const result = run('qemu-io', ['-f', 'raw', '-c', 'read 0 4096', uri]).finally(() => (finished = true));
    await until('the origin holds the host\'s read', async () => origin.stats.held >= 1, 30_000, 20);
    return { done: () => finished, result };
  }

  function peerGet(agent: ServiceProcess, length: number): { done: () => boolean; answer: Promise<{ status: number; body: Buffer }> } {
    let finished = false;
    const answer = fetch(`${agent.url}/v1/disks/seed/image`, { headers: { authorization: `Bearer ${PEER_TOKEN}`, range: `bytes=0-${length - 1}` } })
      .then(async (res) => ({ status: res.status, body: Buffer.from(await res.arrayBuffer()) }))
      .finally(() => (finished = true));
    return { done: () => finished, answer };
  }

  async function holds(api: AgentClient): Promise<number> {
    const text = await api.metrics();
    return Number(/^dpu_agent_peer_serve_holds_total (\d+)/m.exec(text)?.[1] ?? NaN);
  }

  it('a peer read waits while the host has a request in flight, and is answered whole once the host pauses', async () => {
    const { agent, api, hostUri } = await agentWith('patient', 60_000);
    assert.equal(await holds(api), 0);
    const host = await hostReadHeld(hostUri);
    const peer = peerGet(agent, 2 * MiB);
    await until('the peer read held for the host', async () => (await holds(api)) >= 1, 30_000, 20);
    assert.equal(peer.done(), false, 'not answered while the host waits (it may wait 60 s)');
    assert.equal(host.done(), false);
    origin.release();
    await host.result;
    const got = await peer.answer;
    assert.equal(got.status, 206);
    assert.ok(got.body.equals(imageBytes.subarray(0, 2 * MiB)), 'the image\'s bytes');
    assert.match(await api.metrics(), /^dpu_agent_peer_serve_held_seconds_total [0-9.e-]+$/m);
  });

  it('a host that does not pause still lets a peer answer through, at one piece per host_yield_ms (the floor)', async () => {
    const { agent, api, hostUri } = await agentWith('floor', 20);
    const host = await hostReadHeld(hostUri);
    const got = await peerGet(agent, MiB).answer;
    assert.equal(host.done(), false, 'the host\'s read is still in flight: the answer went out under the floor');
    assert.equal(got.status, 206);
    assert.ok(got.body.equals(imageBytes.subarray(0, MiB)));
    // The target read and each of the answer's 16 pieces waited (the host never paused).
    assert.ok((await holds(api)) >= 17, `${await holds(api)} holds`);
    origin.release();
    await host.result;
  });
});

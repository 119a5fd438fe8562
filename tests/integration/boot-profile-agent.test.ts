/**
 * Boot profiles on the agent, in-process (DiskManager + buildAgentApi over a real socket,
 * responses checked strictly against openapi/dpu-agent.yaml), with a real HTTP origin and
 * a real NBD client (qemu-io) as the host: a host's reads are recorded in the order of
 * their first read; a replayed profile's regions become local before any host read while
 * the sequential sweep is held at the origin; a disabled agent neither records nor
 * replays; bad profiles are refused or ignored with DPU_ERR_PROFILE_INVALID; a finished
 * recording survives a restart and one in progress is reported interrupted.
 *
 * No timing assertions: every wait is for a state, and the interleavings that matter are
 * forced with the origin's `hold`.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { pino } from 'pino';
import type { FastifyInstance } from 'fastify';
import { AgentClient, type Disk, type DiskCreate } from '../../openapi/clients/agent-client.js';
import { ApiError } from '../../openapi/clients/http.js';
import { buildAgentApi } from '../../dpu-agent/src/daemon/api.js';
import { type AgentConfig, parseAgentConfig } from '../../dpu-agent/src/daemon/config.js';
import { DiskManager } from '../../dpu-agent/src/daemon/disks.js';
import { makeImage, tempDir } from '../helpers/agent.js';
import { TestOrigin } from '../helpers/origin.js';
import { run } from '../helpers/run.js';
import { until } from '../helpers/services.js';

const MiB = 1 << 20;
const KiB = 1 << 10;
const IMAGE_SIZE = 24 * MiB;
const REGION = 256 * KiB;
const REGIONS = IMAGE_SIZE / REGION; // 96
const TOKEN = 'test-token-0123456789abcdef';

/** The host: reads through the NBD export with qemu-io, one command after the other. */
async function hostReads(uri: string, reads: [offset: number, length: number][]): Promise<void> {
  const cmds = reads.flatMap(([o, l]) => ['-c', `read ${o} ${l}`]);
  await run('qemu-io', ['-f', 'raw', uri, ...cmds]);
}

class Agent {
  manager!: DiskManager;
  app!: FastifyInstance;
  client!: AgentClient;
  base = '';
  constructor(readonly config: Readonly<AgentConfig>) {}
  async start(): Promise<void> {
    const log = pino({ level: 'warn' });
    this.manager = new DiskManager({ config: this.config, log });
    await this.manager.start();
    this.app = buildAgentApi({ config: this.config, manager: this.manager, log, responseValidation: 'strict' });
    this.base = await this.app.listen({ port: 0, host: '127.0.0.1' });
    this.client = new AgentClient({ baseUrl: this.base, token: TOKEN });
  }
  async stop(): Promise<void> {
    await this.app?.close();
    await this.manager?.close();
  }
}

describe('boot profiles on the agent: record, replay, disabled, bad input', function () {
  this.timeout(120_000);
  let dir: string;
  let cleanup: () => void;
  let origin: TestOrigin;
  let targets: string;
  let agent: Agent;
  let off: Agent;

  const config = (name: string, bootProfiles: Record<string, unknown>): Readonly<AgentConfig> =>
    parseAgentConfig(
      {
        auth: { tokens: [TOKEN] },
        state_dir: path.join(dir, name, 'state'),
        export_dir: path.join(dir, name, 'run'),
        allowed_targets: [targets],
        defaults: { commit_interval_ms: 200, open_timeout_ms: 2000 },
        boot_profiles: bootProfiles,
        log_level: 'warn',
      },
      `${name} config`,
    );
  const body = (id: string, over: Partial<DiskCreate> = {}): DiskCreate => ({
    id,
    source: { url: origin.url, identity: 'image-1' },
    target: { path: path.join(targets, `${id}.raw`) },
    region_size: REGION,
    ...over,
  });
  const rejects = async (p: Promise<unknown>, status: number, code: string, field?: string): Promise<ApiError> => {
    try {
      await p;
    } catch (err) {
      assert.ok(err instanceof ApiError, String(err));
      assert.equal(err.status, status, err.message);
      assert.equal(err.code, code, err.message);
      if (field !== undefined) assert.equal(err.field, field, err.message);
      return err;
    }
    throw new Error(`expected HTTP ${status} ${code}`);
  };

  before(async () => {
    ({ dir, cleanup } = tempDir('boot-profile-agent'));
    const image = path.join(dir, 'image.raw');
    makeImage(image, IMAGE_SIZE, 21);
    origin = new TestOrigin({ file: image });
    await origin.start();
    targets = path.join(dir, 'targets') + '/';
    // A budget of 6 regions ends the first recording; the window is long enough never to.
    agent = new Agent(config('on', { window_ms: 600_000, max_regions: 6 }));
    await agent.start();
    off = new Agent(config('off', { enabled: false }));
    await off.start();
  });
  after(async () => {
    origin?.release();
    await agent?.stop();
    await off?.stop();
    await origin?.stop();
    cleanup?.();
  });

  it('records the first host read of each region, in read order, until the region budget is full', async () => {
    const d = await agent.client.createDisk(body('rec', { hydration: { paused: true } }));
    assert.deepEqual(d.boot_profile, { recording: { state: 'waiting', regions: 0, stop_reason: null }, replay: { state: 'none', regions: 0, local: 0, boots: null, error: null } });
    assert.equal((await agent.client.bootProfile('rec')).state, 'waiting');
    // Region 20, region 4, region 20 again (not recorded twice), regions 80-81 in one read, region 0.
    await hostReads(d.export.uri, [[20 * REGION + 512, 4096], [4 * REGION, 4096], [20 * REGION, 4096], [80 * REGION + REGION / 2, REGION], [0, 4096]]);
    const p = await agent.client.bootProfile('rec');
    assert.equal(p.state, 'recording');
    assert.deepEqual(p.regions, [20, 4, 80, 81, 0]);
    assert.equal(p.region_size, REGION);
    assert.equal(p.image_regions, REGIONS);
    assert.ok(p.started_at && p.ended_at === null);
    const mid = await agent.client.getDisk('rec');
    assert.deepEqual(mid.boot_profile.recording, { state: 'recording', regions: 5, stop_reason: null });
    const metrics = await (await fetch(`${agent.base}/metrics`, { headers: { authorization: `Bearer ${TOKEN}` } })).text();
    assert.match(metrics, /dpu_agent_boot_profile_recording\{disk="rec"\} 1/);
    assert.match(metrics, /dpu_agent_boot_profile_recorded_regions\{disk="rec"\} 5/);
    // Two more regions: the sixth fills the budget and ends the recording; later reads are not recorded.
    await hostReads(d.export.uri, [[4 * REGION, 4096], [50 * REGION, 2 * REGION], [90 * REGION, 4096]]);
    const done = await agent.client.bootProfile('rec');
    assert.equal(done.state, 'done');
    assert.equal(done.stop_reason, 'budget');
    assert.deepEqual(done.regions, [20, 4, 80, 81, 0, 50]);
    assert.ok(done.ended_at);
    await until('boot-profile.json written', async () => fs.existsSync(path.join(dir, 'on', 'state', 'disks', 'rec', 'boot-profile.json')));
  });

  it('replays a profile from creation, before any host read: its regions become local while the sweep is held at the origin', async () => {
    // The sweep starts at region 0 in 8 MiB batches, two at a time: holding the first
    // 16 MiB stops it there. The profile's regions lie after: only the profile brings them.
    origin.hold(0, 16 * MiB);
    try {
      const profile = [93, 70, 88];
      const d = await agent.client.createDisk(body('rep', { boot_profile: { replay: { region_size: REGION, regions: profile, boots: 2 } } }));
      assert.equal(d.boot_profile.replay.state, 'applied');
      assert.equal(d.boot_profile.replay.regions, 3);
      assert.equal(d.boot_profile.replay.boots, 2);
      const ready = await until('the profile\'s regions local', async () => {
        const x = await agent.client.getDisk('rep');
        return x.boot_profile.replay.local === 3 ? x : null;
      });
      const map = await agent.client.regionMap('rep');
      const states = decodeRle(map.map);
      for (const r of profile) assert.equal(states[r], 'L', `profile region ${r} is local`);
      assert.ok(states.slice(0, 64).every((s) => s !== 'L'), `nothing of the held sweep is local: ${map.map}`);
      // No host read happened: it was the profile, not a miss.
      assert.equal(ready.boot_profile.recording.state, 'waiting');
      assert.ok(origin.stats.held >= 1, 'the sweep was held');
      // A host read of a region the profile made local is recorded all the same (the next profile keeps it).
      await hostReads(d.export.uri, [[93 * REGION, 4096]]);
      assert.deepEqual((await agent.client.bootProfile('rep')).regions, [93]);
    } finally {
      origin.release();
    }
    const done = await until('rep complete', async () => {
      const x = await agent.client.getDisk('rep');
      return x.state === 'complete' ? x : null;
    });
    assert.equal(done.boot_profile.replay.local, 3);
  });

  it('refuses a profile of another region size (400) and ignores one that names regions past the image, saying why', async () => {
    await rejects(agent.client.createDisk(body('bad1', { boot_profile: { replay: { region_size: 2 * REGION, regions: [1, 2] } } })), 400, 'DPU_ERR_PROFILE_INVALID', 'boot_profile.replay.region_size');
    await rejects(agent.client.createDisk(body('bad2', { boot_profile: { replay: { region_size: REGION, regions: [-1] } } })), 400, 'DPU_ERR_BAD_REQUEST');
    await rejects(agent.client.createDisk(body('bad3', { boot_profile: { replay: { region_size: REGION, regions: [1.5] } } })), 400, 'DPU_ERR_BAD_REQUEST');
    assert.ok(!fs.existsSync(path.join(dir, 'on', 'state', 'disks', 'bad1')), 'nothing created');
    const d = await agent.client.createDisk(body('bad4', { hydration: { paused: true }, boot_profile: { replay: { region_size: REGION, regions: [5, REGIONS, 7] } } }));
    assert.equal(d.state, 'streaming', 'a profile never fails a disk');
    assert.equal(d.boot_profile.replay.state, 'refused');
    assert.equal(d.boot_profile.replay.local, 0);
    assert.match(d.boot_profile.replay.error!, /^DPU_ERR_PROFILE_INVALID: .*region 96 \(entry 1\).*regions 0-95/);
    assert.equal(d.regions.local, 0, 'nothing of it was copied');
  });

  it('disabled: nothing is recorded, a profile is not replayed', async () => {
    const d = await off.client.createDisk(body('quiet', { hydration: { paused: true }, boot_profile: { replay: { region_size: REGION, regions: [40, 41] } } }));
    assert.equal(d.boot_profile.replay.state, 'disabled');
    assert.equal(d.boot_profile.recording.state, 'off');
    await hostReads(d.export.uri, [[3 * REGION, 4096]]);
    const p = await off.client.bootProfile('quiet');
    assert.equal(p.state, 'off');
    assert.deepEqual(p.regions, []);
    const after = await off.client.getDisk('quiet');
    assert.equal(after.boot_profile.replay.local, 0);
    const states = decodeRle((await off.client.regionMap('quiet')).map);
    assert.ok(states[40] !== 'L' && states[41] !== 'L', 'the profile was not replayed (hydration paused: only the host\'s miss is fetched)');
  });

  it('a restart keeps a finished recording and reports one in progress interrupted', async () => {
    await agent.stop();
    await agent.start();
    const rec = await agent.client.bootProfile('rec');
    assert.equal(rec.state, 'done');
    assert.deepEqual(rec.regions, [20, 4, 80, 81, 0, 50]);
    const rep: Disk = await agent.client.getDisk('rep');
    assert.equal(rep.boot_profile.recording.state, 'interrupted');
    assert.equal((await agent.client.bootProfile('rep')).state, 'interrupted');
    assert.equal(rep.boot_profile.replay.state, 'applied', 'the profile is applied again at every open');
  });
});

function decodeRle(map: string): string[] {
  const out: string[] = [];
  for (const m of map.matchAll(/(\d+)([rzfL])/g)) for (let i = 0; i < Number(m[1]); i++) out.push(m[2]!);
  return out;
}

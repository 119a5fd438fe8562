/**
 * Boot profiles in `dpu-agent stream` (--record-profile, --boot-profile), the real process
 * against a real HTTP origin, with qemu-io as the host reading through the NBD export: the
 * host's first read of each region is recorded in read order and written to the file when
 * the region budget ends the recording; a recording cut short by SIGTERM is not written;
 * a replayed profile's regions become local before any host read while the sequential
 * sweep is held at the origin; bad profile files are refused as the daemon refuses them.
 *
 * No timing assertions: every wait is for a state (an event, a field of the progress JSON),
 * and the interleaving that matters is forced with the origin's `hold`.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { AgentProcess, type AgentEvent, makeImage, nbdUri, tempDir } from '../helpers/agent.js';
import { TestOrigin } from '../helpers/origin.js';
import { run } from '../helpers/run.js';

const MiB = 1 << 20;
const KiB = 1 << 10;
const IMAGE_SIZE = 24 * MiB;
const REGION = 256 * KiB;
const REGIONS = IMAGE_SIZE / REGION; // 96

/** The host: reads through the NBD export with qemu-io, one command after the other. */
async function hostReads(socket: string, reads: [offset: number, length: number][]): Promise<void> {
  await run('qemu-io', ['-f', 'raw', nbdUri(socket), ...reads.flatMap(([o, l]) => ['-c', `read ${o} ${l}`])]);
}

interface BootProfileStatus {
  recording: { state: string; regions: number; stop_reason: string | null };
  replay: { state: string; regions: number; local: number; boots: number | null; error: string | null };
}
const bootProfile = (e: AgentEvent): BootProfileStatus => e['bootProfile'] as BootProfileStatus;

describe('dpu-agent stream: --record-profile and --boot-profile', function () {
  this.timeout(120_000);
  let dir: string;
  let cleanup: () => void;
  let image: string;
  let origin: TestOrigin;
  let agents: AgentProcess[] = [];
  let seq = 0;
  const recorded = (): string => path.join(dir, 'recorded.json');

  /** An agent on a fresh target and state directory, 256 KiB regions. */
  const start = (extra: string[]): { agent: AgentProcess; socket: string; target: string; state: string } => {
    const n = ++seq;
    const socket = path.join(dir, `a${n}.sock`);
    const target = path.join(dir, `a${n}.raw`);
    const state = path.join(dir, `a${n}.state`);
    const agent = new AgentProcess({ source: origin.url, target, state, socket, extra: ['--region-size', '256K', ...extra] });
    agents.push(agent);
    return { agent, socket, target, state };
  };
  /** A profile file of `value` (a string is written as it is). */
  const profileFile = (name: string, value: unknown): string => {
    const file = path.join(dir, name);
    fs.writeFileSync(file, typeof value === 'string' ? value : JSON.stringify(value));
    return file;
  };
  /** Runs an agent that must refuse to start: its exit code and what it printed. */
  const refused = async (extra: string[]): Promise<{ code: number | null; stderr: string; state: string }> => {
    const { agent, state } = start(extra);
    const code = await agent.exitCode();
    return { code, stderr: agent.stderr, state };
  };

  before(async () => {
    ({ dir, cleanup } = tempDir('stream-boot-profile'));
    image = path.join(dir, 'image.raw');
    makeImage(image, IMAGE_SIZE, 31);
    origin = new TestOrigin({ file: image });
    await origin.start();
  });
  afterEach(async () => {
    origin.release();
    for (const a of agents) await a.kill();
    agents = [];
  });
  after(async () => {
    await origin?.stop();
    cleanup?.();
  });

  it('records the first host read of each region, in read order, and writes the file when the budget ends the recording', async () => {
    const { agent, socket } = start(['--record-profile', recorded(), '--profile-max-regions', '6']);
    const listening = await agent.listening();
    assert.deepEqual(bootProfile(listening), { recording: { state: 'waiting', regions: 0, stop_reason: null }, replay: { state: 'none', regions: 0, local: 0, boots: null, error: null } });
    // Region 70, 93, 70 again (recorded once), 80-81 in one read, 65: five regions; the
    // profile lies past the first 16 MiB so the replay test can hold the sweep there.
    await hostReads(socket, [[70 * REGION + 512, 4096], [93 * REGION, 4096], [70 * REGION, 4096], [80 * REGION + REGION / 2, REGION], [65 * REGION, 4096]]);
    assert.ok(!fs.existsSync(recorded()), 'nothing is written while recording');
    // 93 again, then 90: the sixth region fills the budget; 66 comes after the end.
    await hostReads(socket, [[93 * REGION, 4096], [90 * REGION, 4096], [66 * REGION, 4096]]);
    const ev = await agent.waitFor((e) => e.event === 'profile-recorded');
    assert.equal(ev['file'], recorded());
    assert.equal(ev['regions'], 6);
    assert.equal(ev['stopReason'], 'budget');
    const p = JSON.parse(fs.readFileSync(recorded(), 'utf8')) as Record<string, unknown>;
    assert.deepEqual(Object.keys(p).sort(), ['ended_at', 'image_regions', 'region_size', 'regions', 'started_at', 'state', 'stop_reason'], 'the shape of GET /v1/disks/{id}/boot-profile');
    assert.equal(p['state'], 'done');
    assert.equal(p['stop_reason'], 'budget');
    assert.deepEqual(p['regions'], [70, 93, 80, 81, 65, 90]);
    assert.equal(p['region_size'], REGION);
    assert.equal(p['image_regions'], REGIONS);
    assert.ok(typeof p['started_at'] === 'string' && typeof p['ended_at'] === 'string');
    assert.ok(!fs.readdirSync(dir).some((f) => f.endsWith('.tmp')), 'written atomically: no temp file left');
    assert.equal(await agent.stop(), 0);
    const stopped = agent.events.find((e) => e.event === 'stopped')!;
    assert.deepEqual(bootProfile(stopped).recording, { state: 'done', regions: 6, stop_reason: 'budget' });
  });

  it('does not write a recording that SIGTERM cut short', async () => {
    const file = path.join(dir, 'cut.json');
    const { agent, socket } = start(['--record-profile', file, '--no-hydrate']);
    await agent.listening();
    await hostReads(socket, [[3 * REGION, 4096]]);
    await agent.waitFor((e) => e.event === 'progress' && bootProfile(e).recording.state === 'recording');
    assert.equal(await agent.stop(), 0);
    assert.ok(!fs.existsSync(file), 'a partial boot is not written');
    const stopped = agent.events.find((e) => e.event === 'stopped')!;
    assert.equal(bootProfile(stopped).recording.state, 'interrupted');
    assert.match(agent.stderr, /recording had not finished: not written/);
  });

  it('replays the recorded profile before any host read: its regions become local while the sweep is held at the origin', async () => {
    assert.ok(fs.existsSync(recorded()), 'the recording test ran first');
    // The sweep starts at region 0 in 8 MiB batches, two at a time: holding the first
    // 16 MiB stops it there. The profile's regions lie after it: only the profile brings them.
    origin.hold(0, 16 * MiB);
    const { agent, target } = start(['--boot-profile', recorded()]);
    const listening = await agent.listening();
    const { replay, recording } = bootProfile(listening);
    assert.equal(replay.state, 'applied');
    assert.equal(replay.regions, 6);
    assert.equal(replay.error, null);
    assert.equal(recording.state, 'off');
    // replay.local counts the profile's regions whose state is local or zero. No host read
    // was made, so it was the profile that brought them, not a miss.
    const ready = await agent.waitFor((e) => e.event === 'progress' && bootProfile(e).replay.local === 6);
    // A profile region's batch takes the remote regions after it too (up to 8 MiB), so more
    // than 6 may be local — but only past the held 16 MiB, where 32 regions lie.
    assert.ok((ready['regionsLocal'] as number) <= REGIONS - 64, `only regions past the held sweep are local: ${String(ready['regionsLocal'])}`);
    assert.equal(ready['complete'], false);
    assert.ok(origin.stats.held >= 1, 'the sweep was held');
    origin.release();
    await agent.complete();
    assert.equal(await agent.stop(), 0);
    assert.ok(fs.readFileSync(target).equals(fs.readFileSync(image)), 'the target is the image');
  });

  it('refuses bad profile files with DPU_ERR_PROFILE_INVALID, as the daemon refuses a create request\'s', async () => {
    // Another region size, or malformed: the agent exits before it opens anything (the daemon's 400).
    const cases: [unknown, RegExp][] = [
      [{ region_size: 2 * REGION, regions: [1, 2] }, /DPU_ERR_PROFILE_INVALID: .*of 524288-byte regions; this disk has 262144-byte regions/],
      [{ region_size: REGION, regions: [-1] }, /DPU_ERR_PROFILE_INVALID: .*regions entry 0 is -1, not a region number/],
      [{ region_size: REGION, regions: [4, 1.5] }, /DPU_ERR_PROFILE_INVALID: .*regions entry 1 is 1.5, not a region number/],
      [{ region_size: REGION }, /DPU_ERR_PROFILE_INVALID: .*regions is missing/],
      [{ region_size: 'big', regions: [] }, /DPU_ERR_PROFILE_INVALID: .*region_size "big" is not an integer/],
      [[1, 2, 3], /DPU_ERR_PROFILE_INVALID: .*is not a boot profile/],
      ['{"region_size": 262144, "regions": [1,', /DPU_ERR_PROFILE_INVALID: .*not JSON/],
    ];
    for (const [i, [value, message]] of cases.entries()) {
      const r = await refused(['--boot-profile', profileFile(`bad${i}.json`, value)]);
      assert.equal(r.code, 1, r.stderr);
      assert.match(r.stderr, message);
      assert.ok(!fs.existsSync(r.state), 'nothing was opened or created');
    }
    const missing = await refused(['--boot-profile', path.join(dir, 'no-such-profile.json')]);
    assert.equal(missing.code, 2, missing.stderr);
    assert.match(missing.stderr, /DPU_ERR_CONFIG: .*--boot-profile .*no-such-profile\.json/);
    const stray = await refused(['--profile-window', '10s']);
    assert.equal(stray.code, 2, stray.stderr);
    assert.match(stray.stderr, /DPU_ERR_CONFIG: .*--profile-window needs --record-profile/);

    // A region past the image: the disk is served all the same, the profile not at all.
    const { agent } = start(['--no-hydrate', '--boot-profile', profileFile('past.json', { region_size: REGION, regions: [5, REGIONS, 7] })]);
    const listening = await agent.listening();
    const replay = bootProfile(listening).replay;
    assert.equal(replay.state, 'refused');
    assert.equal(replay.local, 0);
    assert.match(replay.error!, /^DPU_ERR_PROFILE_INVALID: .*region 96 \(entry 1\).*regions 0-95/);
    await agent.waitFor((e) => e.event === 'progress'); // the log on stderr is written before the events, through another pipe
    assert.match(agent.stderr, /boot profile refused/);
    assert.equal(await agent.stop(), 0);
    assert.equal(agent.events.find((e) => e.event === 'stopped')!['regionsLocal'], 0, 'nothing of it was copied');
  });
});

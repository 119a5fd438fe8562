/**
 * The agent as a user runs it (`dpu-agent stream`, a real process) against the NBD clients
 * real hosts and tools use: qemu-img, qemu-io, nbdcopy, nbdinfo, fio.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { AgentProcess, makeImage, nbdUri, tempDir } from '../helpers/agent.js';
import { TestOrigin } from '../helpers/origin.js';
import { run } from '../helpers/run.js';

const MiB = 1 << 20;

describe('dpu-agent stream with real NBD clients', function () {
  this.timeout(120_000);
  let dir: string;
  let cleanup: () => void;
  let imagePath: string;
  let origin: TestOrigin;
  let agent: AgentProcess | null = null;
  const size = 48 * MiB + 12345; // not a multiple of the region size

  before(() => {
    ({ dir, cleanup } = tempDir('clients'));
    imagePath = path.join(dir, 'image.raw');
    makeImage(imagePath, size, 7);
  });
  after(() => cleanup());
  beforeEach(async () => {
    origin = new TestOrigin({ file: imagePath });
    await origin.start();
  });
  afterEach(async () => {
    await agent?.kill();
    agent = null;
    await origin.stop();
  });

  function start(name: string, extra: string[] = []): { agent: AgentProcess; sock: string; target: string; state: string } {
    const sock = path.join(dir, `${name}.sock`);
    const target = path.join(dir, `${name}.target`);
    const state = path.join(dir, `${name}.state`);
    agent = new AgentProcess({ source: origin.url, target, state, socket: sock, extra });
    return { agent, sock, target, state };
  }

  it('serves the image byte for byte while hydrating, and the target equals it at the end', async () => {
    const a = start('compare', ['--bandwidth', '16M']);
    await a.agent.listening();
    const info = await run('nbdinfo', ['--json', nbdUri(a.sock)]);
    const exp = (JSON.parse(info.stdout) as { exports: { 'export-size': number; 'can_flush': boolean }[] }).exports[0]!;
    assert.equal(exp['export-size'], size);
    const cmp = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', imagePath, nbdUri(a.sock)]);
    assert.match(cmp.stdout, /Images are identical/);
    const done = await a.agent.complete();
    assert.equal(done['regionsLocal'], done['regionsTotal']);
    assert.ok((done['bytesFetched'] as number) <= size * 1.01, `fetched ${String(done['bytesFetched'])} for a ${size}-byte image`);
    assert.ok(fs.readFileSync(a.target).subarray(0, size).equals(fs.readFileSync(imagePath)), 'target equals image');
    assert.equal(await a.agent.stop(), 0);
  });

  it('nbdcopy over several connections (multi-conn) reads the image exactly', async () => {
    const a = start('nbdcopy', ['--no-hydrate']);
    await a.agent.listening();
    const out = path.join(dir, 'copy.raw');
    await run('nbdcopy', [nbdUri(a.sock), out]);
    assert.ok(fs.readFileSync(out).equals(fs.readFileSync(imagePath)));
    fs.rmSync(out);
  });

  it('nbdinfo and qemu-io see FAST_ZERO and the region size as preferred block; qemu-io fast zeroing works or is refused untouched', async () => {
    const a = start('fastzero', ['--no-hydrate']);
    await a.agent.listening();
    const info = await run('nbdinfo', ['--json', nbdUri(a.sock)]);
    const exp = (JSON.parse(info.stdout) as { exports: Record<string, unknown>[] }).exports[0]!;
    assert.equal(exp['can_fast_zero'], true);
    assert.equal(exp['block_size_preferred'], MiB, 'the region size while streaming');
    // qemu-io `write -z -n` sends WRITE_ZEROES with FAST_ZERO (and NO_HOLE unless -u).
    const io = (cmd: string) => run('qemu-io', ['-f', 'raw', nbdUri(a.sock), '-c', cmd], { allowFail: true });
    const whole = await io(`write -z -u -n ${2 * MiB} ${2 * MiB}`); // two whole remote regions: the map only
    assert.doesNotMatch(whole.stdout + whole.stderr, /failed/);
    const partial = await io(`write -z -u -n ${5 * MiB + 4096} 4096`); // would need a fetch
    assert.match(partial.stdout + partial.stderr, /write failed: Operation not supported/);
    const noHole = await io(`write -z -n ${6 * MiB} ${MiB}`); // NO_HOLE: zeros must be written
    assert.match(noHole.stdout + noHole.stderr, /write failed: Operation not supported/);
    const out = path.join(dir, 'fastzero.raw');
    await run('nbdcopy', [nbdUri(a.sock), out]);
    const want = Buffer.from(fs.readFileSync(imagePath));
    want.fill(0, 2 * MiB, 4 * MiB);
    assert.ok(fs.readFileSync(out).equals(want), 'zeros where the fast zero succeeded, the image everywhere else');
    fs.rmSync(out);
  });

  it('qemu-io pattern writes across regions read back, around image bytes, after a restart', async () => {
    const a = start('qemuio', ['--no-hydrate']);
    await a.agent.listening();
    const cmds = [
      'write -P 0xab 5000 70000', // partial, first region
      `write -P 0xcd ${MiB - 4096} 8192`, // straddles regions 0 and 1
      `write -P 0xef ${3 * MiB} ${2 * MiB}`, // two whole regions: no fetch
      `write -z ${6 * MiB + 100} 1000`, // partial zeroing
      `write -z ${8 * MiB} ${MiB}`, // whole-region zeroing
      `discard ${10 * MiB} ${MiB}`,
      'flush',
    ];
    await run('qemu-io', ['-f', 'raw', nbdUri(a.sock), ...cmds.flatMap((c) => ['-c', c])]);
    assert.equal(await a.agent.stop(), 0);
    const b = start('qemuio', ['--no-hydrate']);
    await b.agent.listening();
    const checks = ['read -P 0xab 5000 70000', `read -P 0xcd ${MiB - 4096} 8192`, `read -P 0xef ${3 * MiB} ${2 * MiB}`, `read -P 0 ${6 * MiB + 100} 1000`, `read -P 0 ${8 * MiB} ${MiB}`];
    const res = await run('qemu-io', ['-f', 'raw', nbdUri(b.sock), ...checks.flatMap((c) => ['-c', c])]);
    assert.doesNotMatch(res.stdout + res.stderr, /Pattern verification failed|error/i);
    // Bytes around the writes are the image's.
    const img = fs.readFileSync(imagePath);
    const out = path.join(dir, 'qemuio.raw');
    await run('nbdcopy', [nbdUri(b.sock), out]);
    const got = fs.readFileSync(out);
    assert.ok(got.subarray(0, 5000).equals(img.subarray(0, 5000)));
    assert.ok(got.subarray(75000, MiB - 4096).equals(img.subarray(75000, MiB - 4096)));
    assert.ok(got.subarray(6 * MiB, 6 * MiB + 100).equals(img.subarray(6 * MiB, 6 * MiB + 100)));
    assert.ok(got.subarray(6 * MiB + 1100, 8 * MiB).equals(img.subarray(6 * MiB + 1100, 8 * MiB)));
    assert.ok(got.subarray(11 * MiB).equals(img.subarray(11 * MiB)));
    fs.rmSync(out);
  });

  it('fio random writes verify (crc32c) through the nbd engine while streaming', async () => {
    const a = start('fio', ['--bandwidth', '8M']);
    await a.agent.listening();
    const res = await run('fio', [
      '--name=verify',
      '--ioengine=nbd',
      `--uri=${nbdUri(a.sock)}`,
      '--rw=randwrite',
      '--bsrange=4k-256k',
      '--size=32m',
      '--iodepth=16',
      '--verify=crc32c',
      '--verify_fatal=1',
      '--do_verify=1',
      '--verify_state_save=0',
      '--output-format=json',
    ]);
    const json = JSON.parse(res.stdout.slice(res.stdout.indexOf('{'))) as { jobs: { error: number; write: { io_bytes: number } }[] };
    assert.equal(json.jobs[0]!.error, 0);
    assert.ok(json.jobs[0]!.write.io_bytes >= 32 * MiB);
  });

  it('resumes after SIGTERM without re-fetching local regions', async () => {
    // The origin holds back 24..40 MiB, so the first run is stopped mid-hydration however
    // fast it copies the rest.
    origin.hold(24 * MiB, 40 * MiB);
    const a = start('resume', ['--bandwidth', '12M']);
    await a.agent.listening();
    await a.agent.waitFor((e) => e.event === 'progress' && (e['regionsLocal'] as number) >= 12, 30_000);
    assert.equal(await a.agent.stop(), 0);
    const stopped = a.agent.events.find((e) => e.event === 'stopped')!;
    const localAtStop = stopped['regionsLocal'] as number;
    assert.ok(localAtStop >= 12 && localAtStop <= (stopped['regionsTotal'] as number) - 16, `${localAtStop} regions local at the stop, none of the held ones`);
    origin.release();
    const b = start('resume');
    const listening = await b.agent.listening();
    assert.equal(listening['regionsLocal'], localAtStop, 'every region local at the stop is still local');
    const done = await b.agent.complete();
    const fetched = done['bytesFetched'] as number;
    assert.ok(fetched <= size - localAtStop * MiB + MiB, `second run fetched ${fetched}, but ${localAtStop} MiB were already local`);
    assert.ok(fs.readFileSync(b.target).equals(fs.readFileSync(imagePath)));
  });

  it('refuses a state directory made for another image, saying what to do', async () => {
    const a = start('mismatch', ['--no-hydrate']);
    await a.agent.listening();
    await a.agent.stop();
    await origin.stop();
    const other = path.join(dir, 'other.raw');
    makeImage(other, 8 * MiB, 99);
    origin = new TestOrigin({ file: other });
    await origin.start();
    const b = start('mismatch');
    assert.equal(await b.agent.exitCode(), 1);
    assert.match(b.agent.stderr, /DPU_ERR_SOURCE_MISMATCH: .*new --state directory/);
  });

  it('refuses bad flags with exit code 2 and a message naming the flag', async () => {
    const bad = await run(process.execPath, [path.resolve('dpu-agent/bin/dpu-agent.js'), 'stream', '--source', origin.url, '--target', '/tmp/x', '--state', '/tmp/y', '--listen', 'udp:1'], { allowFail: true });
    assert.equal(bad.code, 2);
    assert.match(bad.stderr, /DPU_ERR_CONFIG: .*listen endpoint "udp:1" must start with unix: or tcp:/);
    const bad2 = await run(process.execPath, [path.resolve('dpu-agent/bin/dpu-agent.js'), 'stream', '--source', origin.url, '--target', '/tmp/x', '--state', '/tmp/y', '--listen', 'unix:/tmp/z', '--region-size', '3M'], { allowFail: true });
    assert.equal(bad2.code, 2);
    assert.match(bad2.stderr, /region size 3145728 must be a power of two/);
    const missing = await run(process.execPath, [path.resolve('dpu-agent/bin/dpu-agent.js'), 'stream', '--source', origin.url], { allowFail: true });
    assert.equal(missing.code, 2);
    assert.match(missing.stderr, /--target is required/);
  });
});

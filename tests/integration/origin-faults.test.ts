/**
 * An origin that fails in every way an origin can: the disk answers correct bytes, or a
 * clean I/O error once its retries run out — never a wrong byte — and recovers when the
 * origin does.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { AgentProcess, makeImage, nbdUri, tempDir } from '../helpers/agent.js';
import { type Fault, TestOrigin } from '../helpers/origin.js';
import { run } from '../helpers/run.js';

const MiB = 1 << 20;

describe('origin faults', function () {
  this.timeout(120_000);
  let dir: string;
  let cleanup: () => void;
  let imagePath: string;
  let agent: AgentProcess | null = null;
  let origin: TestOrigin | null = null;

  before(() => {
    ({ dir, cleanup } = tempDir('faults'));
    imagePath = path.join(dir, 'image.raw');
    makeImage(imagePath, 24 * MiB, 11);
  });
  after(() => cleanup());
  afterEach(async () => {
    await agent?.kill();
    await origin?.stop();
    agent = null;
    origin = null;
  });

  async function startAgent(name: string, o: TestOrigin, extra: string[]): Promise<{ sock: string; target: string }> {
    const sock = path.join(dir, `${name}.sock`);
    const target = path.join(dir, `${name}.target`);
    agent = new AgentProcess({ source: o.url, target, state: path.join(dir, `${name}.state`), socket: sock, extra: ['--stall-timeout', '300ms', '--retry-deadline', '5s', ...extra] });
    await agent.listening();
    return { sock, target };
  }

  it('5xx, resets, truncation, 200-for-206, wrong Content-Range and stalls: correct bytes', async () => {
    const kinds: Fault[] = ['500', 'reset', 'truncate', 'full200', 'wrong-range', '503', 'stall', 'truncate', 'reset', 'full200'];
    const faults: Fault[] = [];
    for (let i = 0; i < 4; i++) faults.push(...kinds);
    origin = new TestOrigin({ file: imagePath, faults });
    await origin.start();
    // Faults are consumed by the first GETs: the disk's size probe uses HEAD, so every
    // fault lands on a data read.
    const { sock, target } = await startAgent('mixed', origin, ['--batch-size', '2M']);
    const cmp = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', imagePath, nbdUri(sock)]);
    assert.match(cmp.stdout, /Images are identical/);
    const done = await agent!.complete(60_000);
    assert.equal(origin.stats.faultsInjected, faults.length);
    // Every fault but a 200-for-206 (answered by skipping to the offset) costs one retry.
    assert.equal(done['fetchRetries'], faults.filter((f) => f !== 'full200').length);
    assert.ok(fs.readFileSync(target).equals(fs.readFileSync(imagePath)));
  });

  it('a missing image (404) fails reads with EIO quickly, without retrying, and the agent stays up', async () => {
    origin = new TestOrigin({ file: imagePath });
    await origin.start();
    const { sock } = await startAgent('gone', origin, ['--no-hydrate']);
    (origin as unknown as { opts: { notFound: boolean } }).opts.notFound = true;
    const asked = origin.stats.requests;
    const res = await run('qemu-io', ['-f', 'raw', nbdUri(sock), '-c', 'read 0 4096'], { allowFail: true });
    assert.match(res.stdout + res.stderr, /Input\/output error/);
    // Counted, not timed: one request, no retry (a retried 404 would also fail, but only at the deadline).
    assert.equal(origin.stats.requests - asked, 1, 'a permanent error is not retried');
    (origin as unknown as { opts: { notFound: boolean } }).opts.notFound = false;
    const ok = await run('qemu-io', ['-f', 'raw', nbdUri(sock), '-c', 'read -v 0 16']);
    assert.doesNotMatch(ok.stdout, /error/i);
    assert.equal(agent!.child.exitCode, null, 'agent still running');
  });

  it('an outage longer than the retry deadline gives EIO; reads recover when the origin returns', async () => {
    origin = new TestOrigin({ file: imagePath });
    await origin.start();
    const { sock } = await startAgent('outage', origin, ['--no-hydrate', '--retry-deadline', '1s']);
    origin.setDown(true);
    const res = await run('qemu-io', ['-f', 'raw', nbdUri(sock), '-c', `read ${5 * MiB} 4096`], { allowFail: true });
    assert.match(res.stdout + res.stderr, /Input\/output error/);
    origin.setDown(false);
    const out = path.join(dir, 'outage.out');
    await run('nbdcopy', [nbdUri(sock), out]);
    assert.ok(fs.readFileSync(out).equals(fs.readFileSync(imagePath)), 'no wrong byte after recovery');
  });

  it('an outage shorter than the deadline is invisible to the host', async () => {
    origin = new TestOrigin({ file: imagePath });
    await origin.start();
    const { sock } = await startAgent('blip', origin, ['--no-hydrate']);
    origin.setDown(true);
    setTimeout(() => origin!.setDown(false), 800);
    const out = path.join(dir, 'blip.out');
    await run('nbdcopy', ['--connections=1', nbdUri(sock), out]);
    assert.ok(fs.readFileSync(out).equals(fs.readFileSync(imagePath)));
  });

  it('stopping a disk whose origin is down does not wait out the retry deadline', async () => {
    origin = new TestOrigin({ file: imagePath });
    await origin.start();
    // Slow hydration, so background fetches are in flight when the origin goes away; a
    // 30 s deadline that the shutdown must not sit out (it did: the hydrator was awaited
    // before the source was closed).
    await startAgent('stuck', origin, ['--retry-deadline', '30s', '--bandwidth', '4M', '--batch-size', '1M']);
    await new Promise((r) => setTimeout(r, 300));
    await origin.setDown(true, 'refuse');
    await new Promise((r) => setTimeout(r, 700));
    const t0 = Date.now();
    assert.equal(await agent!.stop(), 0);
    agent = null;
    assert.ok(Date.now() - t0 < 5000, `shutdown took ${Date.now() - t0} ms`);
  });
});

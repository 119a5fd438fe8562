/**
 * Manifests end to end with the real CLI: `dpu-agent manifest` builds one from the origin
 * (refusing an image whose digest is not the expected one), and `dpu-agent stream
 * --manifest` never fetches zero regions and never serves a corrupted region — the
 * origin flips bytes in some answers, and the host still reads the exact image.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { AgentProcess, AGENT_BIN, makeImage, nbdUri, tempDir } from '../helpers/agent.js';
import { TestOrigin } from '../helpers/origin.js';
import { run } from '../helpers/run.js';

const MiB = 1 << 20;

describe('manifests (dpu-agent manifest, stream --manifest)', function () {
  this.timeout(120_000);
  let dir: string;
  let cleanup: () => void;
  let imagePath: string;
  let origin: TestOrigin;
  let agent: AgentProcess | null = null;

  before(async () => {
    ({ dir, cleanup } = tempDir('manifest'));
    imagePath = path.join(dir, 'image.raw');
    makeImage(imagePath, 32 * MiB, 13); // 40%–50% of it is zeros
    origin = new TestOrigin({ file: imagePath });
    await origin.start();
  });
  after(async () => {
    await agent?.kill();
    await origin.stop();
    cleanup();
  });

  it('builds a manifest, and refuses one for an image whose digest differs', async () => {
    const sha512 = createHash('sha512').update(fs.readFileSync(imagePath)).digest('hex');
    const ok = await run(process.execPath, [AGENT_BIN, 'manifest', '--source', origin.url, '--out', path.join(dir, 'm.bin'), '--expect', sha512]);
    const info = JSON.parse(ok.stdout) as { regions: number; zero_regions: number; image_hash: string };
    assert.equal(info.regions, 32);
    assert.ok(info.zero_regions >= 2, `${info.zero_regions} zero regions`);
    assert.equal(info.image_hash, sha512);
    const bad = await run(process.execPath, [AGENT_BIN, 'manifest', '--source', origin.url, '--out', path.join(dir, 'bad.bin'), '--expect', 'ab'.repeat(64)], { allowFail: true });
    assert.equal(bad.code, 1);
    assert.match(bad.stderr, /DPU_ERR_MANIFEST_INVALID: .*not the one Glance describes/);
    assert.equal(fs.existsSync(path.join(dir, 'bad.bin')), false, 'nothing written');
  });

  it('streams with the manifest: corrupted answers are never served, zero regions never fetched', async () => {
    await origin.stop();
    // Every third GET has a flipped byte; some of them land in host reads, some in hydration.
    origin = new TestOrigin({ file: imagePath, faults: ['corrupt', 'corrupt', 'corrupt', 'corrupt'] });
    await origin.start();
    const sock = path.join(dir, 'm.sock');
    const target = path.join(dir, 'm.target');
    agent = new AgentProcess({ source: origin.url, target, state: path.join(dir, 'm.state'), socket: sock, extra: ['--manifest', path.join(dir, 'm.bin'), '--batch-size', '2M'] });
    await agent.listening();
    const cmp = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', imagePath, nbdUri(sock)]);
    assert.match(cmp.stdout, /identical/);
    const done = await agent.complete(60_000);
    assert.ok((done['integrityFailures'] as number) >= 1, `integrity failures: ${String(done['integrityFailures'])}`);
    assert.equal(done['verified'], true);
    const image = fs.readFileSync(imagePath);
    assert.ok(fs.readFileSync(target).equals(image), 'target equals the image');
    await agent.stop();
    agent = null;
  });

  it('fetches exactly the non-zero regions of the image, once', async () => {
    await origin.stop();
    origin = new TestOrigin({ file: imagePath });
    await origin.start();
    const info = JSON.parse((await run(process.execPath, [AGENT_BIN, 'manifest', '--source', origin.url, '--out', path.join(dir, 'm2.bin')])).stdout) as { zero_regions: number };
    const sent = origin.stats.bytesSent;
    agent = new AgentProcess({ source: origin.url, target: path.join(dir, 'z.target'), state: path.join(dir, 'z.state'), socket: path.join(dir, 'z.sock'), extra: ['--manifest', path.join(dir, 'm2.bin')] });
    const done = await agent.complete(60_000);
    assert.equal(done['bytesFetched'], (32 - info.zero_regions) * MiB);
    assert.equal(origin.stats.bytesSent - sent, (32 - info.zero_regions) * MiB, 'the origin sent no byte of a zero region');
    assert.ok(fs.readFileSync(path.join(dir, 'z.target')).equals(fs.readFileSync(imagePath)));
    await agent.stop();
    agent = null;
  });

  it('refuses a manifest made with another region size, saying so', async () => {
    await run(process.execPath, [AGENT_BIN, 'manifest', '--source', origin.url, '--out', path.join(dir, 'm4k.bin'), '--region-size', '4M']);
    const a = new AgentProcess({ source: origin.url, target: path.join(dir, 'x.target'), state: path.join(dir, 'x.state'), socket: path.join(dir, 'x.sock'), extra: ['--manifest', path.join(dir, 'm4k.bin')] });
    assert.equal(await a.exitCode(), 1);
    assert.match(a.stderr, /DPU_ERR_MANIFEST_INVALID: .*4194304-byte regions/);
  });
});

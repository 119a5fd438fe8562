/**
 * The local target as a real block device (a loop device, as the DPU's NVMe SSD would be):
 * its size comes from sysfs, hydration writes through it, and a device smaller than the
 * image is refused with a clear error.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { AgentProcess, makeImage, nbdUri, tempDir } from '../helpers/agent.js';
import { TestOrigin } from '../helpers/origin.js';
import { run } from '../helpers/run.js';

const MiB = 1 << 20;

describe('block-device target (loop device)', function () {
  this.timeout(60_000);
  let dir: string;
  let cleanup: () => void;
  let origin: TestOrigin;
  const loops: string[] = [];
  let agent: AgentProcess | null = null;

  async function loop(file: string, size: number): Promise<string> {
    fs.writeFileSync(file, Buffer.alloc(0));
    fs.truncateSync(file, size);
    const dev = (await run('losetup', ['--find', '--show', file])).stdout.trim();
    loops.push(dev);
    return dev;
  }

  before(async () => {
    ({ dir, cleanup } = tempDir('blockdev'));
    makeImage(path.join(dir, 'image.raw'), 20 * MiB + 4096, 21);
    origin = new TestOrigin({ file: path.join(dir, 'image.raw') });
    await origin.start();
  });
  after(async () => {
    await agent?.kill();
    for (const d of loops) await run('losetup', ['-d', d], { allowFail: true });
    await origin.stop();
    cleanup();
  });

  it('streams into a block device and ends with the device holding the image', async () => {
    const dev = await loop(path.join(dir, 'backing.img'), 32 * MiB);
    // The previous tenant's bytes on the device must never be served.
    fs.writeFileSync(dev, Buffer.alloc(32 * MiB, 0x5a));
    const sock = path.join(dir, 'bd.sock');
    agent = new AgentProcess({ source: origin.url, target: dev, state: path.join(dir, 'state'), socket: sock });
    await agent.listening();
    const cmp = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', path.join(dir, 'image.raw'), nbdUri(sock)]);
    assert.match(cmp.stdout, /identical/);
    await agent.complete();
    assert.equal(await agent.stop(), 0);
    agent = null;
    const image = fs.readFileSync(path.join(dir, 'image.raw'));
    const fd = fs.openSync(dev, 'r');
    const got = Buffer.alloc(image.length);
    fs.readSync(fd, got, 0, got.length, 0);
    fs.closeSync(fd);
    assert.ok(got.equals(image));
  });

  it('refuses a device smaller than the image, naming both sizes', async () => {
    const dev = await loop(path.join(dir, 'small.img'), 8 * MiB);
    const a = new AgentProcess({ source: origin.url, target: dev, state: path.join(dir, 'state-small'), socket: path.join(dir, 'small.sock') });
    assert.equal(await a.exitCode(), 1);
    assert.match(a.stderr, new RegExp(`DPU_ERR_TARGET_TOO_SMALL: .*${dev} holds ${8 * MiB} bytes, the image needs ${20 * MiB + 4096}`));
  });
});

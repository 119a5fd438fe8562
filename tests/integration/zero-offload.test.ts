/**
 * Zero regions of a sparse image are made local without writing data: a hole punched in a
 * file target, BLKZEROOUT on a device. The previous tenant's bytes are on the target
 * first, so the test fails if a zeroed range still holds them, or if the agent served or
 * left anything but the image.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { AgentProcess, AGENT_BIN, nbdUri, tempDir } from '../helpers/agent.js';
import { TestOrigin } from '../helpers/origin.js';
import { run } from '../helpers/run.js';

const MiB = 1 << 20;
const SIZE = 160 * MiB;

/** 160 MiB: data at 0–4 MiB, 80–84 MiB and the last 4 MiB; two zero runs of 76 MiB. */
function makeSparse(file: string): void {
  const fd = fs.openSync(file, 'w');
  fs.ftruncateSync(fd, SIZE);
  for (const [off, byte] of [[0, 0x11], [80 * MiB, 0x22], [SIZE - 4 * MiB, 0x33]] as const) {
    const b = Buffer.alloc(4 * MiB, byte);
    for (let i = 0; i < b.length; i += 4096) b.writeUInt32LE(i + off, i); // no two pages alike
    fs.writeSync(fd, b, 0, b.length, off);
  }
  fs.closeSync(fd);
}

describe('zero regions are zeroed without writing data', function () {
  this.timeout(120_000);
  let dir: string;
  let cleanup: () => void;
  let image: string;
  let manifest: string;
  let origin: TestOrigin;
  let agent: AgentProcess | null = null;
  const loops: string[] = [];

  before(async () => {
    ({ dir, cleanup } = tempDir('zero-offload'));
    image = path.join(dir, 'image.raw');
    makeSparse(image);
    origin = new TestOrigin({ file: image });
    await origin.start();
    manifest = path.join(dir, 'm.bin');
    await run(process.execPath, [AGENT_BIN, 'manifest', '--source', origin.url, '--out', manifest]);
  });
  after(async () => {
    await agent?.kill();
    for (const d of loops) await run('losetup', ['-d', d], { allowFail: true });
    await origin.stop();
    cleanup();
  });

  async function streamInto(target: string, name: string): Promise<void> {
    const sock = path.join(dir, `${name}.sock`);
    agent = new AgentProcess({ source: origin.url, target, state: path.join(dir, `${name}.state`), socket: sock, extra: ['--manifest', manifest] });
    await agent.listening();
    const done = await agent.complete(60_000);
    assert.equal(done['bytesFetched'], 12 * MiB, 'only the data regions crossed the network');
    const cmp = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', image, nbdUri(sock)]);
    assert.match(cmp.stdout, /identical/);
    assert.equal(await agent.stop(), 0);
    agent = null;
  }

  it('punches holes in a file target that held another image', async () => {
    const target = path.join(dir, 'file.target');
    fs.writeFileSync(target, Buffer.alloc(SIZE, 0x5a)); // the previous tenant, fully allocated
    await streamInto(target, 'file');
    assert.ok(fs.readFileSync(target).equals(fs.readFileSync(image)), 'target equals the image');
    // 12 MiB of data plus the short zero runs written around them; the 76 MiB runs are holes.
    const allocated = fs.statSync(target).blocks * 512;
    assert.ok(allocated < 40 * MiB, `${allocated} bytes allocated: the zero runs were written, not punched`);
  });

  it('zeroes ranges of a block device with BLKZEROOUT', async () => {
    const backing = path.join(dir, 'backing.img');
    fs.writeFileSync(backing, Buffer.alloc(SIZE, 0x5a));
    const dev = (await run('losetup', ['--find', '--show', backing])).stdout.trim();
    loops.push(dev);
    await streamInto(dev, 'dev');
    const fd = fs.openSync(dev, 'r');
    const got = Buffer.alloc(SIZE);
    fs.readSync(fd, got, 0, SIZE, 0);
    fs.closeSync(fd);
    assert.ok(got.equals(fs.readFileSync(image)), 'device equals the image');
  });
});

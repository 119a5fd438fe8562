// Proves the boot fixture and the QEMU harness on their own, served by a
// reference NBD server (nbdkit), so failures in our own NBD server tests can
// be told apart from a broken image or harness.

import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdtemp, open, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';

import { BOOT_MARKER, bootFromNbd, buildBootImage, nbdUriToQemu } from '../helpers/boot-image.js';

async function waitForSocket(sock: string, proc: ChildProcess, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!existsSync(sock)) {
    if (proc.exitCode !== null || proc.signalCode !== null) {
      throw new Error(`nbdkit exited early (${proc.signalCode ?? proc.exitCode})`);
    }
    if (Date.now() > deadline) throw new Error(`nbdkit socket ${sock} did not appear in ${timeoutMs} ms`);
    await sleep(50);
  }
}

async function sha256OfTail(file: string, bytes: number): Promise<string> {
  const { size } = await stat(file);
  const fh = await open(file, 'r');
  try {
    const buf = Buffer.alloc(bytes);
    await fh.read(buf, 0, bytes, size - bytes);
    return createHash('sha256').update(buf).digest('hex');
  } finally {
    await fh.close();
  }
}

describe('boot image fixture (served by nbdkit)', function () {
  // First run may download the Debian kernel; the TCG boot itself takes ~5 s.
  this.timeout(180_000);

  let dir = '';
  let image = '';
  let sock = '';
  let nbdkit: ChildProcess | undefined;
  let nbdkitErr = '';

  before(async function () {
    dir = await mkdtemp(path.join(tmpdir(), 'smartnic-boot-'));
    image = path.join(dir, 'boot.raw');
    sock = path.join(dir, 'nbd.sock');
    await buildBootImage(image, { sizeMiB: 64 });
    nbdkit = spawn('nbdkit', ['-f', '-U', sock, 'file', image], { stdio: ['ignore', 'ignore', 'pipe'] });
    nbdkit.stderr!.setEncoding('utf8').on('data', (d: string) => { nbdkitErr += d; });
    try {
      await waitForSocket(sock, nbdkit, 10_000);
    } catch (e) {
      throw new Error(`${(e as Error).message}\n${nbdkitErr}`);
    }
  });

  after(async function () {
    if (nbdkit?.pid !== undefined && nbdkit.exitCode === null && nbdkit.signalCode === null) {
      const gone = new Promise((r) => nbdkit!.once('close', r));
      process.kill(nbdkit.pid, 'SIGKILL');
      await gone;
    }
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  it('translates NBD URIs to QEMU syntax', function () {
    assert.equal(nbdUriToQemu('nbd+unix:///?socket=/tmp/x.sock'), 'nbd:unix:/tmp/x.sock');
    assert.equal(nbdUriToQemu('nbd+unix:///disk?socket=/tmp/x.sock'), 'nbd:unix:/tmp/x.sock:exportname=disk');
    assert.equal(nbdUriToQemu('nbd://127.0.0.1:10810/'), 'nbd:127.0.0.1:10810');
    assert.equal(nbdUriToQemu('nbd://localhost/'), 'nbd:localhost:10809');
    assert.equal(nbdUriToQemu('nbd:unix:/a'), 'nbd:unix:/a');
  });

  it('boots from the NVMe disk and prints the marker', async function () {
    let markerCalls = 0;
    const lines: string[] = [];
    const res = await bootFromNbd(`nbd+unix:///?socket=${sock}`, {
      timeoutMs: 150_000,
      onMarker: () => { markerCalls++; },
      log: (l) => lines.push(l),
    });

    assert.ok(res.serial.includes(BOOT_MARKER), 'marker in serial output');
    assert.equal(markerCalls, 1);
    assert.ok(res.markerSeenMs > 0 && res.markerSeenMs < 150_000, `markerSeenMs=${res.markerSeenMs}`);
    // exit code 0 means the guest powered off by itself rather than being killed.
    assert.equal(res.exitCode, 0, `QEMU exit code; serial:\n${res.serial.slice(-2048)}`);
    assert.ok(lines.some((l) => l.includes(BOOT_MARKER)), 'log callback saw the marker line');

    // The guest saw the whole disk and read its last 4 KiB through NBD correctly.
    const { size } = await stat(image);
    assert.match(res.serial, new RegExp(`SMARTNIC-NVME-SIZE sectors=${size / 512} bytes=${size}`));
    const tail = /SMARTNIC-NVME-TAIL-SHA256 ([0-9a-f]{64})/.exec(res.serial);
    assert.ok(tail, 'guest printed the tail hash');
    assert.equal(tail[1], await sha256OfTail(image, 4096));
    console.log(`      boot: marker after ${Math.round(res.markerSeenMs)} ms`);
  });

  it('rejects with serial output on timeout and leaves no QEMU behind', async function () {
    await assert.rejects(
      bootFromNbd(`nbd+unix:///?socket=${sock}`, { marker: 'NEVER-PRINTED-MARKER', timeoutMs: 1_500 }),
      (e: Error) => /timed out/.test(e.message) && /last serial output/.test(e.message),
    );
  });
});

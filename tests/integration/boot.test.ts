/**
 * The product's promise, end to end at the data-plane level: a QEMU host (TCG) boots
 * firmware, bootloader and Linux from an emulated NVMe disk backed by the agent's export,
 * reaches its marker while hydration is still copying the image, and when hydration ends
 * the local target equals the image. The origin holds back a range the guest never reads
 * until the marker, so hydration provably cannot have finished first, whatever the
 * machine's speed.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { AgentProcess, nbdUri, tempDir } from '../helpers/agent.js';
import { bootFromNbd, buildBootImage, unreadRange } from '../helpers/boot-image.js';
import { TestOrigin } from '../helpers/origin.js';


describe('boot a host from the streaming disk', function () {
  this.timeout(240_000);
  let dir: string;
  let cleanup: () => void;
  let origin: TestOrigin;
  let agent: AgentProcess | null = null;

  before(async () => {
    ({ dir, cleanup } = tempDir('boot'));
    await buildBootImage(path.join(dir, 'boot.raw'), { sizeMiB: 64 });
    origin = new TestOrigin({ file: path.join(dir, 'boot.raw') });
    await origin.start();
  });
  after(async () => {
    await agent?.kill();
    await origin.stop();
    cleanup();
  });

  it('reaches the boot marker before hydration ends; the target equals the image after', async () => {
    const image = fs.readFileSync(path.join(dir, 'boot.raw'));
    const sock = path.join(dir, 'boot.sock');
    const target = path.join(dir, 'boot.target');
    // Hydration runs during the boot (capped, so that it visibly does) but cannot finish
    // before the marker: the origin holds back a range the guest never reads until then.
    const held = unreadRange(64);
    origin.hold(held.from, held.to);
    agent = new AgentProcess({ source: origin.url, target, state: path.join(dir, 'state'), socket: sock, extra: ['--bandwidth', '4M'] });
    await agent.listening();
    let atMarker: { regionsLocal: number; regionsTotal: number; complete: boolean } | null = null;
    const serial: string[] = [];
    const result = await bootFromNbd(nbdUri(sock), {
      timeoutMs: 120_000,
      log: (line) => serial.push(line),
      onMarker: () => {
        const p = agent!.latestProgress()!;
        atMarker = { regionsLocal: p['regionsLocal'] as number, regionsTotal: p['regionsTotal'] as number, complete: agent!.events.some((e) => e.event === 'complete') };
      },
    });
    assert.ok(result.markerSeenMs > 0);
    console.log(`      boot marker ${result.markerSeenMs} ms after QEMU started`);
    assert.ok(atMarker, 'marker seen');
    const m = atMarker as { regionsLocal: number; regionsTotal: number; complete: boolean };
    assert.equal(m.complete, false, 'hydration still running at the marker');
    assert.ok(m.regionsLocal <= m.regionsTotal - (held.to - held.from) / (1 << 20), `at the marker ${m.regionsLocal}/${m.regionsTotal} regions were local, none of the held ones`);
    // The guest read the disk's last 4 KiB through the export and printed its hash.
    const tail = serial.join('\n').match(/SMARTNIC-NVME-TAIL-SHA256 ([0-9a-f]{64})/);
    assert.ok(tail, `guest printed its tail hash:\n${serial.slice(-10).join('\n')}`);
    assert.equal(tail[1], createHash('sha256').update(image.subarray(image.length - 4096)).digest('hex'));

    origin.release();
    await agent.complete(120_000);
    assert.ok(fs.readFileSync(target).equals(image), 'local target equals the image');
    assert.ok(origin.stats.bytesSent <= image.length * 1.01, `origin sent ${origin.stats.bytesSent} bytes for a ${image.length}-byte image`);
    assert.equal(await agent.stop(), 0);
  });
});

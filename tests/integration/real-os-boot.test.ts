/**
 * A real OS from the streaming disk: a Debian 12 cloud image (GPT, GRUB, the cloud
 * kernel, systemd, cloud-init; tests/fixtures/make-debian-image.sh) boots to its serial
 * login prompt from the DPU agent's export of a streaming disk, once under OVMF (UEFI)
 * and once under SeaBIOS (BIOS).
 *
 * Each disk is created with its background copy paused, and resumed only after the login
 * prompt: so everything the firmware, GRUB, the kernel, systemd and cloud-init read was
 * fetched on demand, and the boot provably did not wait for (or get help from) the copy —
 * a fact of the setup, not a race against the clock. The test reports how much of the
 * image that was. Then the copy runs to completion under a disk the guest has written to.
 *
 * Two boots of about a minute each under TCG; the deadlines are generous and nothing here
 * asserts on time.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { formatBytes } from '../../dpu-agent/src/cli/units.js';
import { AgentClient, type Disk } from '../../openapi/clients/agent-client.js';
import { tempDir } from '../helpers/agent.js';
import { bootFromNbd, buildDebianImage, DEBIAN_ROOT_UUID, type Firmware, LOGIN_PROMPT } from '../helpers/boot-image.js';
import { TestOrigin } from '../helpers/origin.js';
import { agentDaemon, type ServiceProcess, TOKEN, until } from '../helpers/services.js';

const MiB = 1 << 20;

interface Variant {
  boot: 'uefi' | 'bios';
  firmware: Firmware;
  /** What the firmware prints on the serial console when it starts the disk's boot loader. */
  firmwareBooted: RegExp;
}

const VARIANTS: Variant[] = [
  // OVMF names the boot option after the NVMe controller, serial number included.
  { boot: 'uefi', firmware: 'ovmf', firmwareBooted: /BdsDxe: starting Boot\w+ "UEFI QEMU NVMe Ctrl smartnic-uefi/ },
  { boot: 'bios', firmware: 'seabios', firmwareBooted: /Booting from Hard Disk/ },
];

/** Bytes at [from, to) of a file. */
function readRange(file: string, from: number, to: number): Buffer {
  const fd = fs.openSync(file, 'r');
  try {
    const buf = Buffer.alloc(to - from);
    fs.readSync(fd, buf, 0, buf.length, from);
    return buf;
  } finally {
    fs.closeSync(fd);
  }
}

describe('a real OS (Debian 12 cloud image) boots from the streaming disk', function () {
  // Each boot: about a minute to the prompt (300 s allowed), then the rest of the copy.
  this.timeout(600_000);
  this.slow(180_000);
  let dir: string;
  let cleanup: () => void;
  const origins = new Map<string, TestOrigin>();
  let agent: ServiceProcess | null = null;
  let client: AgentClient;

  before(async function () {
    // The first build runs mmdebstrap (a few minutes, and the Debian mirror); later ones
    // copy the cached images.
    this.timeout(30 * 60_000);
    ({ dir, cleanup } = tempDir('real-os'));
    for (const v of VARIANTS) {
      const image = path.join(dir, `debian12-${v.boot}.raw`);
      await buildDebianImage(image, { boot: v.boot, log: (l) => console.log(`      ${l}`) });
      const origin = new TestOrigin({ file: image });
      await origin.start();
      origins.set(v.boot, origin);
    }
    agent = await agentDaemon({ dir: path.join(dir, 'agent') });
    await agent.start();
    client = new AgentClient({ baseUrl: agent.url, token: TOKEN });
  });

  after(async () => {
    await agent?.stop();
    for (const o of origins.values()) await o.stop();
    cleanup?.();
  });

  for (const v of VARIANTS) {
    it(`${v.boot} (${v.firmware}): reaches the login prompt on regions fetched on demand alone; the held copy then completes`, async () => {
      const origin = origins.get(v.boot)!;
      const image = path.join(dir, `debian12-${v.boot}.raw`);
      const size = fs.statSync(image).size;
      const target = path.join(dir, 'agent', 'targets', `${v.boot}.raw`);
      const created = await client.createDisk({ id: `debian-${v.boot}`, source: { url: origin.url }, target: { path: target }, hydration: { paused: true } });
      assert.equal(created.size, size);
      assert.equal(created.hydration.state, 'paused');

      let atPrompt: Disk | null = null;
      const result = await bootFromNbd(created.export.uri, {
        firmware: v.firmware,
        nvmeSerial: `smartnic-${v.boot}`,
        network: true,
        memoryMiB: 1024,
        marker: LOGIN_PROMPT,
        timeoutMs: 300_000,
        // The guest keeps running at its prompt: read the disk's state there, then stop it.
        onMarker: async () => {
          atPrompt = await client.getDisk(created.id);
        },
        afterMarker: 'stop',
      });
      // The boot chain ran from the NVMe disk that is the agent's export, to multi-user.
      // A miss keeps the whole console (it is long) in a file the message names.
      const expectSerial = (re: RegExp, what: string): void => {
        if (re.test(result.serial)) return;
        const file = path.join(os.tmpdir(), `real-os-boot-${v.boot}-serial.log`);
        fs.writeFileSync(file, result.serial);
        assert.fail(`${what}: ${re} is not on the serial console (kept in ${file})`);
      };
      expectSerial(v.firmwareBooted, 'the firmware started the boot loader on the NVMe disk');
      // The kernel prints its command line twice ("Command line:", then "Kernel command
      // line:"); either will do. Under TCG the emulated UART can drop a character of the
      // early console (seen once in CI: "5a3c6e1f" as "53c6e1f" in the first, whole in the second).
      expectSerial(new RegExp(`[Cc]ommand line: .*root=UUID=${DEBIAN_ROOT_UUID} .*console=ttyS0,115200`), 'GRUB started the kernel with the image\'s root and the serial console');
      expectSerial(/EXT4-fs \(nvme0n1p2\): mounted filesystem/, 'the root file system is the NVMe disk\'s second partition');
      expectSerial(/ci-info: .*\|\s+10\.0\.2\.15\s+\|/, 'cloud-init brought the NIC up with DHCP (QEMU user networking hands out 10.0.2.15)');

      // Nothing of it came from the background copy: it was held the whole time.
      assert.ok(atPrompt, 'the disk was read at the prompt');
      const p = atPrompt as Disk;
      assert.equal(p.hydration.state, 'paused', 'the background copy was still held at the login prompt');
      assert.equal(p.state, 'streaming');
      assert.ok(p.regions.local < p.regions.total, `at the prompt ${p.regions.local}/${p.regions.total} regions were local`);
      assert.ok(p.bytes_fetched > 0 && p.bytes_fetched < size, `the boot fetched ${p.bytes_fetched} of ${size} bytes`);
      console.log(
        `      ${v.boot}: login prompt ${(result.markerSeenMs / 1000).toFixed(1)} s after QEMU started; the boot fetched ` +
          `${formatBytes(p.bytes_fetched)} of ${formatBytes(size)} (${((100 * p.bytes_fetched) / size).toFixed(1)}%), ` +
          `${p.regions.local}/${p.regions.total} regions of ${formatBytes(p.region_size)} local`,
      );

      // The copy resumes and completes under a disk the guest has written to (journal,
      // machine-id, host keys, cloud-init's state).
      await client.updateHydration(created.id, { paused: false });
      const done = await until(`disk ${created.id} complete`, async () => {
        const d = await client.getDisk(created.id);
        return d.state === 'complete' ? d : null;
      }, 240_000, 500);
      assert.equal(done.regions.local, done.regions.total);
      assert.equal(done.last_error, null);
      assert.equal(fs.statSync(target).size, size);
      // Where the guest writes nothing (the protective MBR and primary GPT, the backup GPT
      // at the end), the local disk is the image.
      for (const [from, to] of [[0, MiB], [size - MiB, size]] as const) {
        assert.ok(readRange(target, from, to).equals(readRange(image, from, to)), `local bytes ${from}..${to} equal the image`);
      }
      assert.ok(origin.stats.bytesSent <= size * 1.01, `the origin sent ${origin.stats.bytesSent} bytes for a ${size}-byte image: each region about once`);
      await client.deleteDisk(created.id, false);
    });
  }
});

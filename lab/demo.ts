/**
 * `npm run demo`: the data plane end to end on one machine. Builds a small bootable Linux
 * disk image, serves it from an HTTP origin paced to an emulated link rate, starts
 * `dpu-agent stream` on it, and boots a QEMU host from the agent's export as its NVMe
 * disk — showing the host boot while the image is still being copied, then a summary.
 *
 * The Ironic deploy path (conductor → driver service → agent) comes with the lab
 * (issues 3, 4 and 6); this demo is the part of it that exists today.
 */
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { formatBytes, parseRate } from '../dpu-agent/src/cli/units.js';
import { AgentProcess, nbdUri, tempDir } from '../tests/helpers/agent.js';
import { bootFromNbd, buildBootImage } from '../tests/helpers/boot-image.js';
import { TestOrigin } from '../tests/helpers/origin.js';

const HELP = `Usage: npm run demo -- [--image-mib N] [--link RATE] [--bandwidth RATE] [--keep]

  --image-mib N     size of the bootable image (default 256, at least 26)
  --link RATE       origin link rate, e.g. 1gbit, 200mbit, 50M (default 200mbit)
  --bandwidth RATE  cap on background hydration (default: none)
  --keep            keep the work directory (image, target, state) afterwards
`;

async function main(): Promise<number> {
  const { values } = parseArgs({
    options: { 'image-mib': { type: 'string', default: '256' }, link: { type: 'string', default: '200mbit' }, bandwidth: { type: 'string' }, keep: { type: 'boolean' }, help: { type: 'boolean' } },
  });
  if (values.help) {
    process.stdout.write(HELP);
    return 0;
  }
  const imageMiB = Number(values['image-mib']);
  if (!Number.isInteger(imageMiB) || imageMiB < 26) throw new Error(`--image-mib ${values['image-mib']} must be an integer of at least 26`);
  const link = parseRate(values.link!, '--link');
  const { dir, cleanup } = tempDir('smartnic-demo');
  const image = path.join(dir, 'image.raw');
  say(`building a ${imageMiB} MiB bootable image (Debian kernel + busybox) in ${dir}`);
  await buildBootImage(image, { sizeMiB: imageMiB });
  const origin = new TestOrigin({ file: image, rate: link });
  const url = await origin.start();
  say(`origin ${url} paced to ${formatBytes(link)}/s`);
  const sock = path.join(dir, 'disk.sock');
  const target = path.join(dir, 'local-nvme.raw');
  const extra = values.bandwidth ? ['--bandwidth', values.bandwidth] : [];
  const agent = new AgentProcess({ source: url, target, state: path.join(dir, 'state'), socket: sock, extra });
  const t0 = Date.now();
  let markerAt = 0;
  let hydratedAt = 0;
  const tty = process.stdout.isTTY;
  const ticker = setInterval(() => {
    const p = agent.latestProgress();
    if (!p) return;
    const frac = (p['regionsLocal'] as number) / (p['regionsTotal'] as number);
    const host = markerAt ? `booted at ${(markerAt / 1000).toFixed(1)} s` : 'booting…';
    const line = `t=${((Date.now() - t0) / 1000).toFixed(1).padStart(5)} s  host: ${host.padEnd(18)} disk: ${bar(frac)} ${(frac * 100).toFixed(0).padStart(3)}% local, fetched ${formatBytes(p['bytesFetched'] as number)}`;
    process.stdout.write(tty ? `\r${line}\x1b[K` : `${line}\n`);
  }, tty ? 250 : 2000);
  try {
    await agent.listening();
    say(`agent exporting ${nbdUri(sock)}; starting QEMU with it as an NVMe disk`);
    const bootStart = Date.now();
    const boot = bootFromNbd(nbdUri(sock), { timeoutMs: 180_000, onMarker: () => void (markerAt = Date.now() - t0) });
    const hydrated = agent.complete(30 * 60_000).then(() => (hydratedAt = Date.now() - t0));
    const result = await boot;
    await hydrated;
    clearInterval(ticker);
    if (tty) process.stdout.write('\n');
    const done = agent.latestProgress()!;
    const same = hash(fs.readFileSync(target)) === hash(fs.readFileSync(image));
    await agent.stop();
    process.stdout.write(
      [
        '',
        'summary',
        `  image                    ${formatBytes(fs.statSync(image).size)}, origin at ${formatBytes(link)}/s`,
        `  QEMU start → boot marker ${(result.markerSeenMs / 1000).toFixed(1)} s (agent start → marker ${(markerAt / 1000).toFixed(1)} s; QEMU started ${((bootStart - t0) / 1000).toFixed(1)} s in)`,
        `  hydration complete       ${(hydratedAt / 1000).toFixed(1)} s after the agent started`,
        `  fetched from the origin  ${formatBytes(done['bytesFetched'] as number)} (${((done['bytesFetched'] as number) / fs.statSync(image).size).toFixed(3)}× the image)`,
        `  local disk = image       ${same ? 'yes' : 'NO'}`,
        '',
      ].join('\n'),
    );
    return same ? 0 : 1;
  } finally {
    clearInterval(ticker);
    await agent.kill();
    await origin.stop();
    if (values.keep) say(`kept ${dir}`);
    else cleanup();
  }
}

function bar(frac: number): string {
  const n = Math.round(frac * 20);
  return `[${'#'.repeat(n)}${'.'.repeat(20 - n)}]`;
}

function hash(b: Buffer): string {
  return createHash('sha256').update(b).digest('hex');
}

function say(s: string): void {
  process.stdout.write(`demo: ${s}\n`);
}

main().then(
  (code) => process.exit(code),
  (err: Error) => {
    process.stderr.write(`demo: ${err.message}\n`);
    process.exit(1);
  },
);

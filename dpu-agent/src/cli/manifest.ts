/**
 * `dpu-agent manifest`: reads an image once and writes its manifest — per region a Merkle
 * root over 64 KiB leaves, the leaves, and whether it is all zeros — checked against the digest the cloud records
 * (Glance's os_hash_value) when given. `dpu-agent stream --manifest FILE` then verifies
 * every fetched region and skips the zero ones.
 */
import fs from 'node:fs';
import { pino } from 'pino';
import { DpuError } from '../../../image-access/src/errors.js';
import { Manifest } from '../../../image-access/src/manifest.js';
import { redactUrl } from '../../../image-access/src/redact.js';
import { IMAGE_FORMATS, type ImageFormat, openImageSource } from '../../../image-access/src/open.js';
import { DEFAULT_REGION_SIZE } from '../streaming/open.js';
import { type FlagTable, parseFlags, renderHelp } from './flags.js';
import { parseHeaders } from './stream.js';
import { formatBytes } from './units.js';

export const MANIFEST_FLAGS: FlagTable = {
  source: { kind: 'string', arg: 'URL', required: true, help: 'HTTP(S) URL of the image (raw or qcow2), as for stream.' },
  header: { kind: 'list', arg: '"NAME: VALUE"', help: 'Extra request header for the source. Values are never logged.' },
  format: { kind: 'string', arg: 'raw|qcow2|auto', default: 'raw', help: 'How to read the image; the manifest always describes the raw disk.' },
  'region-size': { kind: 'size', arg: 'SIZE', default: String(DEFAULT_REGION_SIZE), help: 'Region size; it must be the region size of the disks that use the manifest.' },
  out: { kind: 'string', arg: 'PATH', required: true, help: 'Where to write the manifest (binary).' },
  algo: { kind: 'string', arg: 'ALGO', default: 'sha512', help: 'Digest of the whole image, as Glance records it (os_hash_algo).' },
  expect: { kind: 'string', arg: 'HEX', help: "The image's expected digest (Glance's os_hash_value); a different one fails the build and writes nothing." },
};

const USAGE = 'dpu-agent manifest --source URL --out PATH [--format raw|qcow2|auto] [--region-size SIZE] [--expect HEX]';
const SUMMARY = `Read an image once and write its manifest: every region's Merkle root over 64 KiB
leaves, the leaf hashes, and which regions are all zeros. The whole-image digest is printed, and checked against --expect.`;

export function manifestHelp(): string {
  return renderHelp(USAGE, SUMMARY, MANIFEST_FLAGS);
}

export async function runManifest(argv: string[]): Promise<number> {
  const f = parseFlags(MANIFEST_FLAGS, argv, 'manifest');
  if (f['help']) {
    process.stdout.write(manifestHelp());
    return 0;
  }
  const format = String(f['format']) as ImageFormat;
  if (!IMAGE_FORMATS.includes(format)) throw new DpuError('DPU_ERR_CONFIG', `--format "${format}" is not one of ${IMAGE_FORMATS.join(', ')}`);
  const log = pino({ level: 'warn' }, pino.destination(2));
  const url = String(f['source']);
  // No host reads behind this one: whole requests (see backgroundRequestMs).
  const source = await openImageSource({ source: { url, headers: parseHeaders(f['header'] as string[] | undefined), backgroundRequestMs: 0 }, format, log });
  const t0 = Date.now();
  try {
    const manifest = await Manifest.build(source, {
      regionSize: f['region-size'] as number,
      imageHashAlgo: String(f['algo']),
      ...(f['expect'] ? { expectedImageHash: String(f['expect']) } : {}),
    });
    const out = String(f['out']);
    fs.writeFileSync(`${out}.tmp`, manifest.encode());
    fs.renameSync(`${out}.tmp`, out);
    process.stdout.write(
      JSON.stringify({
        event: 'manifest',
        source: redactUrl(url),
        out,
        size: manifest.size,
        region_size: manifest.regionSize,
        regions: manifest.count,
        zero_regions: manifest.zeroRegions,
        image_hash_algo: manifest.imageHashAlgo,
        image_hash: manifest.imageHash.toString('hex'),
        seconds: (Date.now() - t0) / 1000,
      }) + '\n',
    );
    process.stderr.write(`dpu-agent: ${formatBytes(manifest.size)} in ${manifest.count} regions (${manifest.zeroRegions} all zeros) → ${out}\n`);
    return 0;
  } finally {
    await source.close();
  }
}

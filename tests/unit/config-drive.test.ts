/**
 * The config drive partition, checked against the tools ironic-python-agent uses: the GPT
 * edit must be what `sgdisk -e` then `sgdisk -n 0:-64MB:0` make of the same disk (sgdisk
 * reads ours back and verifies it), an MBR edit what sfdisk reads as a fourth-or-fewer
 * primary of the last 64 MiB; the drive is Ironic's kind of ISO (genisoimage -V config-2).
 * Everything refused leaves the disk byte for byte as it was.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import type { BlockBackend } from '../../dpu-agent/src/block/backend.js';
import { DpuError } from '../../image-access/src/errors.js';
import { filesystemLabel } from '../../common/src/config-drive.js';
import { checkConfigDrive, writeConfigDrive } from '../../dpu-agent/src/streaming/config-drive.js';
import { tempDir } from '../helpers/agent.js';
import { run } from '../helpers/run.js';

const MiB = 1 << 20;

/** A plain file as a block device: what the config drive code needs of a disk, nothing more. */
class FileDisk implements BlockBackend {
  readonly capabilities = { readOnly: false, flush: true, fua: true, trim: false, writeZeroes: false, fastZero: false, cache: false, multiConn: false };
  readonly size: number;
  private readonly fd: number;
  flushes = 0;
  constructor(readonly file: string) {
    this.fd = fs.openSync(file, 'r+');
    this.size = fs.fstatSync(this.fd).size;
  }
  read(offset: number, dest: Buffer): void {
    fs.readSync(this.fd, dest, 0, dest.length, offset);
  }
  write(offset: number, chunks: readonly Buffer[]): void {
    let at = offset;
    for (const c of chunks) at += fs.writeSync(this.fd, c, 0, c.length, at);
  }
  flush(): void {
    fs.fdatasyncSync(this.fd);
    this.flushes++;
  }
  trim(): void {}
  writeZeroes(): void {}
  cache(): void {}
  async close(): Promise<void> {
    fs.closeSync(this.fd);
  }
}

async function makeIso(dir: string, label = 'config-2', extraMiB = 0): Promise<Buffer> {
  const root = path.join(dir, `iso-${label}-${extraMiB}`);
  fs.mkdirSync(path.join(root, 'openstack', 'latest'), { recursive: true });
  fs.writeFileSync(path.join(root, 'openstack', 'latest', 'meta_data.json'), JSON.stringify({ uuid: 'n1', public_keys: { k: 'ssh-ed25519 AAAA test' } }));
  fs.writeFileSync(path.join(root, 'openstack', 'latest', 'user_data'), '#!/bin/sh\necho SMARTNIC-USER-DATA\n');
  if (extraMiB) fs.writeFileSync(path.join(root, 'filler.bin'), Buffer.alloc(extraMiB * MiB, 7));
  const out = path.join(dir, `cd-${label}-${extraMiB}.iso`);
  // As openstacksdk's configdrive.build calls it.
  await run('genisoimage', ['-o', out, '-ldots', '-allow-lowercase', '-allow-multidot', '-l', '-publisher', 'test', '-quiet', '-J', '-r', '-V', label, root]);
  return fs.readFileSync(out);
}

const sha = (file: string): string => createHash('sha256').update(fs.readFileSync(file)).digest('hex');

interface SgPart {
  number: number;
  first: number;
  last: number;
  code: string;
}

async function sgdiskParts(file: string): Promise<SgPart[]> {
  const out = (await run('sgdisk', ['-p', file])).stdout;
  return out
    .split('\n')
    .map((l) => /^\s+(\d+)\s+(\d+)\s+(\d+)\s+\S+\s+\S+\s+([0-9A-F]{4})/.exec(l))
    .filter((m): m is RegExpExecArray => m !== null)
    .map((m) => ({ number: Number(m[1]), first: Number(m[2]), last: Number(m[3]), code: m[4]! }));
}

async function expectRefusal(disk: FileDisk, drive: Buffer, pattern: RegExp): Promise<void> {
  const before = sha(disk.file);
  await assert.rejects(writeConfigDrive(disk, drive), (err: unknown) => {
    assert.ok(err instanceof DpuError, String(err));
    assert.equal(err.code, 'DPU_ERR_CONFIG_DRIVE');
    assert.match(err.message, pattern);
    return true;
  });
  assert.equal(sha(disk.file), before, 'a refused config drive changes nothing');
}

describe('config drive partition (as ironic-python-agent writes it)', function () {
  this.timeout(60_000);
  let tmp: { dir: string; cleanup: () => void };
  let iso: Buffer;
  before(async () => {
    tmp = tempDir('cfgdrive');
    iso = await makeIso(tmp.dir);
  });
  after(() => tmp.cleanup());

  /** A 100 MiB GPT image (ESP + root to its end), then grown to `diskMiB` as a root disk. */
  async function gptDisk(name: string, diskMiB: number): Promise<string> {
    const file = path.join(tmp.dir, name);
    fs.rmSync(file, { force: true });
    fs.writeFileSync(file, Buffer.alloc(0));
    fs.truncateSync(file, 100 * MiB);
    await run('sgdisk', ['-o', '-n', '1:2048:+20M', '-t', '1:ef00', '-n', '2:0:0', '-t', '2:8300', file]);
    fs.truncateSync(file, diskMiB * MiB);
    return file;
  }

  it('GPT: the partition sgdisk -e and sgdisk -n 0:-64MB:0 make, the drive in it, a table sgdisk verifies', async () => {
    const ours = await gptDisk('gpt-ours.img', 300);
    const theirs = path.join(tmp.dir, 'gpt-sgdisk.img');
    fs.copyFileSync(ours, theirs);
    await run('sgdisk', ['-e', theirs]);
    await run('sgdisk', ['-n', '0:-64MB:0', theirs]);

    const disk = new FileDisk(ours);
    const placed = await writeConfigDrive(disk, iso);
    await disk.close();
    assert.deepEqual(await sgdiskParts(ours), await sgdiskParts(theirs));
    assert.equal(placed.table, 'gpt');
    assert.equal(placed.partition, 3);
    assert.equal(placed.reused, false);
    const [, , p3] = await sgdiskParts(ours);
    assert.equal(placed.offset, p3!.first * 512);
    assert.equal(placed.length, (p3!.last - p3!.first + 1) * 512);
    const v = await run('sgdisk', ['-v', ours]);
    assert.match(v.stdout, /No problems found/, v.stdout);
    // The protective MBR covers the grown disk, as sgdisk's does.
    const mbr = (f: string): Buffer => fs.readFileSync(f).subarray(446, 462);
    assert.equal(mbr(ours).readUInt32LE(12), mbr(theirs).readUInt32LE(12));
    const bytes = fs.readFileSync(ours).subarray(placed.offset, placed.offset + iso.length);
    assert.ok(bytes.equals(iso), 'the drive is at the partition\'s start');
    // blkid finds the config-2 filesystem where cloud-init will look.
    const label = await run('blkid', ['-p', '-O', String(placed.offset), '-o', 'value', '-s', 'LABEL', ours]);
    assert.equal(label.stdout.trim(), 'config-2');
  });

  it('GPT: a second write reuses the config-2 partition (a retried job adds nothing)', async () => {
    const file = await gptDisk('gpt-twice.img', 300);
    const disk = new FileDisk(file);
    const first = await writeConfigDrive(disk, iso);
    const second = await writeConfigDrive(disk, await makeIso(tmp.dir, 'config-2', 1));
    await disk.close();
    assert.equal(second.reused, true);
    assert.equal(second.partition, first.partition);
    assert.equal(second.offset, first.offset);
    assert.equal((await sgdiskParts(file)).length, 3);
  });

  it('GPT: no 64 MiB free at the disk\'s end (the disk is the image) is refused, naming root_gb', async () => {
    const file = await gptDisk('gpt-full.img', 100);
    const disk = new FileDisk(file);
    await expectRefusal(disk, iso, /no 64 MiB free.*root_gb/);
    await disk.close();
  });

  it('GPT: a damaged table is refused, not rewritten', async () => {
    const file = await gptDisk('gpt-bad.img', 300);
    const fd = fs.openSync(file, 'r+');
    fs.writeSync(fd, Buffer.from([0x42]), 0, 1, 1024 + 40); // inside the first entry
    fs.closeSync(fd);
    const disk = new FileDisk(file);
    await expectRefusal(disk, iso, /entries fail their CRC/);
    await disk.close();
  });

  async function mbrDisk(name: string, parts: number, diskMiB: number): Promise<string> {
    const file = path.join(tmp.dir, name);
    fs.rmSync(file, { force: true });
    fs.writeFileSync(file, Buffer.alloc(0));
    fs.truncateSync(file, diskMiB * MiB);
    const lines = ['label: dos'];
    for (let i = 0; i < parts; i++) lines.push(`start=${2048 + i * 20480}, size=20480, type=83`);
    await run('bash', ['-c', `printf '%s\\n' ${lines.map((l) => `'${l}'`).join(' ')} | sfdisk -q ${file}`]);
    return file;
  }

  async function sfdiskParts(file: string): Promise<{ node: string; start: number; size: number; type: string }[]> {
    return (JSON.parse((await run('sfdisk', ['-J', file])).stdout) as { partitiontable: { partitions: { node: string; start: number; size: number; type: string }[] } }).partitiontable.partitions;
  }

  it('MBR: a primary partition over the last 64 MiB, as parted mkpart primary fat32 -64MiB -0', async () => {
    const file = await mbrDisk('mbr.img', 2, 300);
    const disk = new FileDisk(file);
    const placed = await writeConfigDrive(disk, iso);
    await disk.close();
    const parts = await sfdiskParts(file);
    assert.equal(parts.length, 3);
    assert.deepEqual({ start: parts[2]!.start, size: parts[2]!.size, type: parts[2]!.type }, { start: (300 - 64) * 2048, size: 64 * 2048, type: 'c' });
    assert.deepEqual(placed, { table: 'mbr', partition: 3, offset: (300 - 64) * MiB, length: 64 * MiB, reused: false });
    assert.ok(fs.readFileSync(file).subarray(placed.offset, placed.offset + iso.length).equals(iso));
  });

  it('MBR: four primary partitions are refused, as IPA refuses them', async () => {
    const file = await mbrDisk('mbr4.img', 4, 300);
    const disk = new FileDisk(file);
    await expectRefusal(disk, iso, /four primary partitions/);
    await disk.close();
  });

  it('MBR: on a disk over 2 TiB the partition lies below 2 TiB', async () => {
    const file = await mbrDisk('mbr-3t.img', 1, 3 * 1024 * 1024); // sparse
    const disk = new FileDisk(file);
    const placed = await writeConfigDrive(disk, iso);
    await disk.close();
    const [, p2] = await sfdiskParts(file);
    assert.equal(p2!.start + p2!.size, 2 ** 32 - 2048);
    assert.equal(placed.offset, p2!.start * 512);
    fs.rmSync(file);
  });

  it('refuses a drive cloud-init could not use, naming what is wrong', async () => {
    assert.throws(() => checkConfigDrive(Buffer.alloc(0)), /empty/);
    assert.throws(() => checkConfigDrive(Buffer.alloc(40000, 1)), /neither an ISO 9660 nor a FAT/);
    assert.throws(() => checkConfigDrive(Buffer.alloc(65 * MiB)), /at most 64 MiB/);
    const other = await makeIso(tmp.dir, 'cidata');
    assert.throws(() => checkConfigDrive(other), /labelled "cidata".*"config-2"/);
    assert.deepEqual(filesystemLabel(iso), { fs: 'iso9660', label: 'config-2' });
    const vfat = path.join(tmp.dir, 'cd.vfat');
    fs.rmSync(vfat, { force: true });
    await run('mkfs.vfat', ['-C', '-n', 'CONFIG-2', vfat, '2048']);
    assert.deepEqual(filesystemLabel(fs.readFileSync(vfat)), { fs: 'vfat', label: 'CONFIG-2' });
    checkConfigDrive(fs.readFileSync(vfat));
    const file = await mbrDisk('mbr-bad-drive.img', 1, 300);
    const disk = new FileDisk(file);
    await expectRefusal(disk, other, /cidata/);
    await disk.close();
  });

  it('an image without a partition table is refused', async () => {
    const file = path.join(tmp.dir, 'raw.img');
    fs.writeFileSync(file, Buffer.alloc(0));
    fs.truncateSync(file, 200 * MiB);
    const disk = new FileDisk(file);
    await expectRefusal(disk, iso, /no partition table/);
    await disk.close();
  });
});

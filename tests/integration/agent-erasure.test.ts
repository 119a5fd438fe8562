/**
 * POST /v1/erasures: the DPU erases a target no disk uses, as Ironic's clean steps ask,
 * driven in-process through the typed client (responses checked strictly against
 * openapi/dpu-agent.yaml), on file targets and on a real block device (a 256 MiB loop
 * device): `full` leaves every byte zero, `metadata` the ends of the device and of each
 * partition (the middle untouched, no signature left for libblkid); refusals while a disk
 * uses the target or an erasure runs on it; progress; cancel and restart.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import type { FastifyInstance } from 'fastify';
import { pino } from 'pino';
import { AgentClient, type Erasure } from '../../openapi/clients/agent-client.js';
import { ApiError } from '../../openapi/clients/http.js';
import { buildAgentApi } from '../../dpu-agent/src/daemon/api.js';
import { type AgentConfig, parseAgentConfig } from '../../dpu-agent/src/daemon/config.js';
import { DiskManager } from '../../dpu-agent/src/daemon/disks.js';
import { DpuError } from '../../image-access/src/errors.js';
import { makeImage, tempDir } from '../helpers/agent.js';
import { TestOrigin } from '../helpers/origin.js';
import { run } from '../helpers/run.js';

const MiB = 1 << 20;
const LOOP_SIZE = 256 * MiB;
const TOKEN = 'test-token-0123456789abcdef';

async function until<T>(what: string, fn: () => Promise<T | undefined | false>, timeoutMs = 60_000, everyMs = 50): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, everyMs));
  }
}

async function rejects(p: Promise<unknown>, status: number, code: string, field?: string): Promise<ApiError> {
  try {
    await p;
  } catch (err) {
    assert.ok(err instanceof ApiError, `an ApiError, not ${String(err)}`);
    assert.equal(err.status, status, err.message);
    assert.equal(err.code, code, err.message);
    if (field !== undefined) assert.equal(err.field, field, err.message);
    return err;
  }
  throw new Error(`expected HTTP ${status} ${code}`);
}

function throwsCode(fn: () => unknown, code: string): void {
  assert.throws(fn, (e: unknown) => e instanceof DpuError && e.code === code);
}

/** Reads `length` bytes at `offset` of a file or device, bypassing nothing (the page cache is coherent with BLKZEROOUT). */
function readAt(file: string, offset: number, length: number): Buffer {
  const fd = fs.openSync(file, 'r');
  try {
    const buf = Buffer.alloc(length);
    let done = 0;
    while (done < length) {
      const n = fs.readSync(fd, buf, done, length - done, offset + done);
      if (n === 0) break;
      done += n;
    }
    return buf.subarray(0, done);
  } finally {
    fs.closeSync(fd);
  }
}

/** Whether every byte of the file or device is zero, read in 8 MiB pieces. */
function allZero(file: string, size: number): boolean {
  const zero = Buffer.alloc(8 * MiB);
  for (let off = 0; off < size; off += zero.length) {
    const got = readAt(file, off, Math.min(zero.length, size - off));
    if (!got.equals(zero.subarray(0, got.length))) return false;
  }
  return true;
}

/** A GPT with two 20 MiB partitions (at 1 MiB and 21 MiB) and an ext4 filesystem in the second. */
async function partition(file: string): Promise<void> {
  await run('sgdisk', ['-o', '-n', '1:2048:+20M', '-n', '2:0:+20M', file]);
  await run('mkfs.ext4', ['-q', '-F', '-E', `offset=${21 * MiB}`, file, '20M']);
}

/** What metadata mode leaves of `before` (the layout `partition` makes on a disk of `size`). */
function expectedAfterMetadata(before: Buffer, size: number): Buffer {
  const want = Buffer.from(before);
  for (const [a, b] of [[0, MiB], [MiB, 2 * MiB], [20 * MiB, 21 * MiB], [21 * MiB, 22 * MiB], [40 * MiB, 41 * MiB], [size - MiB, size]] as const) want.fill(0, a, b);
  return want;
}

describe('agent erasures (in-process; file targets and a loop device)', function () {
  this.timeout(300_000);
  let dir: string;
  let cleanup: () => void;
  let targets: string;
  let stateDir: string;
  let config: AgentConfig;
  let manager: DiskManager;
  let app: FastifyInstance;
  let client: AgentClient;
  let base: string;
  let origin: TestOrigin;
  const loops: string[] = [];
  let loopDev = '';
  let loopFile = '';

  const waitDone = (id: string, timeoutMs = 120_000): Promise<Erasure> =>
    until(`erasure ${id} to end`, async () => {
      const e = await client.getErasure(id);
      return e.state !== 'running' ? e : undefined;
    }, timeoutMs);

  before(async () => {
    ({ dir, cleanup } = tempDir('agent-erasure'));
    targets = path.join(dir, 'targets') + '/';
    fs.mkdirSync(targets);
    stateDir = path.join(dir, 'state');
    loopFile = path.join(dir, 'loop-backing.img');
    fs.writeFileSync(loopFile, Buffer.alloc(0));
    fs.truncateSync(loopFile, LOOP_SIZE);
    loopDev = (await run('losetup', ['--find', '--show', loopFile])).stdout.trim();
    loops.push(loopDev);
    makeImage(path.join(dir, 'image.raw'), 4 * MiB, 3);
    origin = new TestOrigin({ file: path.join(dir, 'image.raw') });
    await origin.start();
    config = parseAgentConfig(
      { auth: { tokens: [TOKEN] }, state_dir: stateDir, export_dir: path.join(dir, 'run'), allowed_targets: [targets, loopDev], log_level: 'warn' },
      'test config',
    );
    // fatal: the expected failures (a wipe made to fail) would log errors.
    const log = pino({ level: 'fatal' });
    manager = new DiskManager({ config, log });
    await manager.start();
    app = buildAgentApi({ config, manager, log, responseValidation: 'strict' });
    base = await app.listen({ port: 0, host: '127.0.0.1' });
    client = new AgentClient({ baseUrl: base, token: TOKEN });
  });

  after(async () => {
    await app?.close();
    await manager?.close();
    await origin?.stop();
    for (const d of loops) await run('losetup', ['-d', d], { allowFail: true });
    cleanup?.();
  });

  it('full on a file: every byte reads zero, the size stays, no blocks are left (sparse)', async () => {
    const file = path.join(targets, 'full.raw');
    makeImage(file, 24 * MiB, 9);
    const started = await client.createErasure({ target: { path: file }, mode: 'full' });
    assert.equal(started.state, 'running');
    assert.equal(started.target.kind, 'file');
    assert.equal(started.bytes_total, 24 * MiB);
    const done = await waitDone(started.id);
    assert.equal(done.state, 'done', done.last_error ?? '');
    assert.equal(done.method, 'truncate');
    assert.equal(done.bytes_done, 24 * MiB);
    assert.ok(done.finished_at !== null && done.last_error === null && done.error_code === null);
    const st = fs.statSync(file);
    assert.equal(st.size, 24 * MiB);
    assert.equal(st.blocks, 0, 'the file holds no blocks');
    assert.ok(allZero(file, st.size));
    assert.deepEqual((await client.listErasures()).map((e) => e.id), [started.id]);
  });

  it('metadata on a file: the ends of the disk and of each partition are zeroed, the rest untouched, no signature left', async () => {
    const file = path.join(targets, 'meta.raw');
    makeImage(file, 64 * MiB, 4);
    await partition(file);
    assert.match((await run('blkid', ['-p', '-O', String(21 * MiB), file])).stdout, /TYPE="ext4"/);
    assert.match((await run('wipefs', [file])).stdout, /gpt/);
    const before = fs.readFileSync(file);
    const done = await waitDone((await client.createErasure({ target: { path: file }, mode: 'metadata' })).id);
    assert.equal(done.state, 'done', done.last_error ?? '');
    assert.equal(done.method, 'write');
    assert.equal(done.partitions, 2);
    assert.equal(done.bytes_total, 6 * MiB, 'a MiB at each end of the disk and of each partition');
    assert.ok(fs.readFileSync(file).equals(expectedAfterMetadata(before, 64 * MiB)), 'exactly the ends of the disk and partitions are zero');
    assert.equal((await run('wipefs', [file])).stdout.trim(), '', 'libblkid finds no signature on the disk');
    assert.equal((await run('blkid', ['-p', '-O', String(21 * MiB), file], { allowFail: true })).stdout.trim(), '', 'nor the filesystem in the partition');
  });

  it('a file target that does not exist is done at once, with nothing to erase; a missing device is refused', async () => {
    const done = await waitDone((await client.createErasure({ target: { path: path.join(targets, 'never-created.raw') }, mode: 'full' })).id);
    assert.equal(done.state, 'done');
    assert.equal(done.target.kind, 'absent');
    assert.equal(done.method, 'none');
    assert.equal(done.bytes_total, 0);
    const cfg2 = parseAgentConfig({ auth: { disabled: true }, state_dir: path.join(dir, 'state-dev'), export_dir: path.join(dir, 'run-dev'), allowed_targets: ['/dev/nvme-none'] }, 'dev config');
    const m2 = new DiskManager({ config: cfg2, log: pino({ level: 'silent' }) });
    await m2.start();
    throwsCode(() => m2.erasures.create({ target: { path: '/dev/nvme-none0n1' }, mode: 'metadata' }), 'DPU_ERR_BAD_REQUEST');
    await m2.close();
  });

  it('refuses targets outside allowed_targets, relative paths and bad modes, naming the field', async () => {
    await rejects(client.createErasure({ target: { path: '/etc/passwd' }, mode: 'full' }), 400, 'DPU_ERR_TARGET_NOT_ALLOWED', 'target.path');
    await rejects(client.createErasure({ target: { path: `${targets}../escape.raw` }, mode: 'full' }), 400, 'DPU_ERR_TARGET_NOT_ALLOWED', 'target.path');
    await rejects(client.createErasure({ target: { path: 'targets/x.raw' }, mode: 'full' }), 400, 'DPU_ERR_BAD_REQUEST', 'target.path');
    await rejects(client.createErasure({ target: { path: `${targets}x.raw` }, mode: 'secure' as 'full' }), 400, 'DPU_ERR_BAD_REQUEST', 'mode');
    await rejects(client.getErasure('e-nope'), 404, 'DPU_ERR_NOT_FOUND');
    await rejects(client.getErasure('Bad'), 400, 'DPU_ERR_BAD_REQUEST', 'erasure_id');
    await rejects(new AgentClient({ baseUrl: base }).listErasures(), 401, 'DPU_ERR_UNAUTHORIZED');
  });

  it('refuses a target a disk uses (409) and a disk on a target being erased; erases it once the disk is deleted', async () => {
    const file = path.join(targets, 'used.raw');
    await client.createDisk({ id: 'used', source: { url: origin.url }, target: { path: file }, hydration: { enabled: false } });
    const e = await rejects(client.createErasure({ target: { path: file }, mode: 'metadata' }), 409, 'DPU_ERR_TARGET_IN_USE', 'target.path');
    assert.match(e.message, /disk "used"/);
    // The same target by another name (a symlink) is the same target.
    fs.symlinkSync(file, path.join(targets, 'alias.raw'));
    await rejects(client.createErasure({ target: { path: path.join(targets, 'alias.raw') }, mode: 'full' }), 409, 'DPU_ERR_TARGET_IN_USE');
    await client.deleteDisk('used', false);
    const done = await waitDone((await client.createErasure({ target: { path: file }, mode: 'full' })).id);
    assert.equal(done.state, 'done');
    assert.ok(allZero(file, fs.statSync(file).size));
  });

  it('refuses a target whose deleted disk waits for its wipe (409 DPU_ERR_DISK_WIPING)', async () => {
    const sub = path.join(targets, 'wiping') + '/';
    const file = path.join(sub, 'w.raw');
    await client.createDisk({ id: 'wiping', source: { url: origin.url }, target: { path: file }, hydration: { enabled: false } });
    await run('chattr', ['+i', sub]); // the wipe (removing the file) fails
    try {
      await rejects(client.deleteDisk('wiping', true), 500, 'DPU_ERR_WIPE_FAILED');
      await rejects(client.createErasure({ target: { path: file }, mode: 'full' }), 409, 'DPU_ERR_DISK_WIPING', 'target.path');
    } finally {
      await run('chattr', ['-i', sub]);
    }
    await client.deleteDisk('wiping', true);
    const done = await waitDone((await client.createErasure({ target: { path: file }, mode: 'full' })).id);
    assert.equal(done.target.kind, 'absent', 'the wipe removed the file');
  });

  it('full on a 256 MiB loop device: progress grows, every byte ends zero; while it runs the target is refused to disks and to the other mode', async () => {
    // Every byte non-zero before.
    const fd = fs.openSync(loopDev, 'r+');
    const pattern = Buffer.alloc(8 * MiB, 0x5a);
    for (let off = 0; off < LOOP_SIZE; off += pattern.length) fs.writeSync(fd, pattern, 0, pattern.length, off);
    fs.fsyncSync(fd);
    fs.closeSync(fd);
    const seen: number[] = [];
    let again: string | null = null;
    let otherMode: unknown = null;
    let disk: Promise<string> | null = null;
    const onProgress = (e: Erasure): void => {
      if (e.target.path !== loopDev) return;
      seen.push(e.bytes_done);
      if (again !== null) return;
      // While it runs (this event fires between two steps, and the checks below run before
      // the next one can end): the same request returns it, the other mode and a disk on
      // the target are refused.
      const r = manager.erasures.create({ target: { path: loopDev }, mode: 'full' });
      again = r.created ? 'created twice' : r.erasure.id === e.id ? 'same' : 'other';
      try {
        manager.erasures.create({ target: { path: loopDev }, mode: 'metadata' });
      } catch (err) {
        otherMode = err;
      }
      disk = manager.create({ id: 'on-erasing', source: { url: origin.url }, target: { path: loopDev } }).then(
        () => 'disk created',
        (err: DpuError) => err.code,
      );
    };
    manager.erasures.on('progress', onProgress);
    const t0 = Date.now();
    const started = await client.createErasure({ target: { path: loopDev }, mode: 'full' });
    assert.equal(started.target.kind, 'block');
    assert.equal(started.bytes_total, LOOP_SIZE);
    const done = await waitDone(started.id);
    const wallMs = Date.now() - t0;
    manager.erasures.off('progress', onProgress);
    assert.equal(done.state, 'done', done.last_error ?? '');
    assert.equal(done.method, 'zeroout');
    assert.equal(done.bytes_done, LOOP_SIZE);
    assert.equal(again, 'same');
    assert.ok(otherMode instanceof DpuError && otherMode.code === 'DPU_ERR_TARGET_ERASING', String(otherMode));
    assert.equal(await disk, 'DPU_ERR_TARGET_ERASING');
    assert.ok(seen.length >= 3, `progress reported ${seen.length} times`);
    for (let i = 1; i < seen.length; i++) assert.ok(seen[i]! > seen[i - 1]!, 'bytes_done only grows');
    assert.equal(seen[seen.length - 1], LOOP_SIZE);
    assert.ok(allZero(loopDev, LOOP_SIZE), 'every byte of the device reads zero');
    const ms = Date.parse(done.finished_at!) - Date.parse(done.started_at);
    console.log(`      256 MiB loop device, full erase (${done.method}): ${ms} ms in the agent, ${wallMs} ms seen by the client; ${seen.length} progress steps`);
  });

  it('metadata on the loop device: GPT, partitions and filesystem signature gone, the data between untouched', async () => {
    makeImage(loopFile, LOOP_SIZE, 12); // through the backing file, as the device's previous tenant
    await run('losetup', ['-c', loopDev]);
    await run('blockdev', ['--flushbufs', loopDev]);
    await partition(loopDev);
    const before = readAt(loopDev, 0, LOOP_SIZE);
    const done = await waitDone((await client.createErasure({ target: { path: loopDev }, mode: 'metadata' })).id);
    assert.equal(done.state, 'done', done.last_error ?? '');
    assert.equal(done.partitions, 2);
    assert.ok(readAt(loopDev, 0, LOOP_SIZE).equals(expectedAfterMetadata(before, LOOP_SIZE)));
    assert.equal((await run('wipefs', [loopDev])).stdout.trim(), '');
    assert.equal((await run('blkid', ['-p', '-O', String(21 * MiB), loopDev], { allowFail: true })).stdout.trim(), '');
  });

  it('without BLKZEROOUT (no blkdiscard on PATH) writes zeros instead: every byte ends zero', async () => {
    assert.ok(!allZero(loopDev, LOOP_SIZE), 'the previous test left data on the device');
    const savedPath = process.env['PATH'];
    process.env['PATH'] = path.join(dir, 'no-util-linux');
    let done: Erasure;
    try {
      done = await waitDone((await client.createErasure({ target: { path: loopDev }, mode: 'full' })).id);
    } finally {
      process.env['PATH'] = savedPath;
    }
    assert.equal(done.state, 'done', done.last_error ?? '');
    assert.equal(done.method, 'write');
    assert.equal(done.bytes_done, LOOP_SIZE);
    assert.ok(allZero(loopDev, LOOP_SIZE));
    console.log(`      256 MiB loop device, full erase by writing zeros: ${Date.parse(done.finished_at!) - Date.parse(done.started_at)} ms`);
  });

  it('refuses a block device the kernel holds (mounted)', async () => {
    await run('mkfs.ext4', ['-q', '-F', loopDev]);
    const mnt = path.join(dir, 'mnt');
    fs.mkdirSync(mnt);
    await run('mount', [loopDev, mnt]);
    try {
      const e = await rejects(client.createErasure({ target: { path: loopDev }, mode: 'full' }), 409, 'DPU_ERR_TARGET_IN_USE');
      assert.match(e.message, /held by the kernel/);
    } finally {
      await run('umount', [mnt]);
    }
  });

  it('cancel stops a running erasure (failed, DPU_ERR_ERASE_CANCELLED); a finished one is returned as it was', async () => {
    // Cancelled in the same turn as it started, so before its first step can end.
    const { erasure } = manager.erasures.create({ target: { path: loopDev }, mode: 'full' });
    await manager.erasures.cancel(erasure.id);
    const cancelled = await client.getErasure(erasure.id);
    assert.equal(cancelled.state, 'failed');
    assert.equal(cancelled.error_code, 'DPU_ERR_ERASE_CANCELLED');
    assert.ok(cancelled.bytes_done < LOOP_SIZE);
    const done = (await client.listErasures()).find((e) => e.state === 'done')!;
    assert.deepEqual(await client.cancelErasure(done.id), done);
  });

  it('an agent that stops or crashes mid-erasure reports it failed (interrupted) after the restart; asking again erases', async () => {
    const cfg = { ...config, state_dir: path.join(dir, 'state-restart') } as AgentConfig;
    const log = pino({ level: 'silent' });
    const m1 = new DiskManager({ config: cfg, log });
    await m1.start();
    const { erasure } = m1.erasures.create({ target: { path: loopDev }, mode: 'full' });
    await m1.close(); // SIGTERM: what runs is stopped and recorded
    // A crash leaves the record as it was while running.
    const crashed = { ...erasure, id: 'e-crashed-1', bytes_done: 64 * MiB };
    fs.writeFileSync(path.join(cfg.state_dir, 'erasures', 'e-crashed-1.json'), JSON.stringify(crashed));
    const m2 = new DiskManager({ config: cfg, log });
    await m2.start();
    try {
      const stopped = m2.erasures.get(erasure.id);
      assert.equal(stopped.state, 'failed');
      assert.equal(stopped.error_code, 'DPU_ERR_ERASE_INTERRUPTED');
      assert.match(stopped.last_error!, /agent stopped/);
      const after = m2.erasures.get('e-crashed-1');
      assert.equal(after.state, 'failed');
      assert.equal(after.error_code, 'DPU_ERR_ERASE_INTERRUPTED');
      assert.match(after.last_error!, /restarted while it ran \(67108864 of 268435456 bytes/);
      assert.ok(after.finished_at);
      const again = m2.erasures.create({ target: { path: loopDev }, mode: 'full' });
      assert.equal(again.created, true);
      await new Promise<void>((resolve) => m2.erasures.once('finished', () => resolve()));
      assert.equal(m2.erasures.get(again.erasure.id).state, 'done');
      assert.ok(allZero(loopDev, LOOP_SIZE));
    } finally {
      await m2.close();
    }
  });
});

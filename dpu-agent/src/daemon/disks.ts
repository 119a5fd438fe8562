/**
 * The disks a daemon manages: each one a streaming disk (streaming/open.ts) with its own
 * NBD server on its own socket, created, changed and deleted through the API and resumed
 * when the daemon starts again.
 *
 * Files, per disk, under `<state_dir>/disks/<id>/`:
 *   spec.json    the create request, normalised, with the source headers (mode 0600): all
 *                that is needed to open the disk again. Written atomically (temp file,
 *                fsync, rename, fsync of the directory). A delete with wipe adds
 *                `wipe_pending` to it: the disk is then never opened again, only wiped.
 *   manifest.bin the image manifest uploaded with PUT /v1/disks/{id}/manifest (optional),
 *                re-applied whenever the disk is opened again. Written atomically.
 *   manifest.verifying  present while the regions that were local before the manifest came
 *                are read back and verified; a disk opened with it present runs that pass
 *                again, so `verified` never survives a crash in the middle of it.
 *   boot-profile.json  the boot profile recorded on this disk (streaming/boot-profile.ts),
 *                written once the recording is done, so the driver can still read it after
 *                an agent restart. A recording the agent stopped in the middle of is not
 *                kept: the disk reports it `interrupted` (a partial boot would teach the
 *                next deployment a wrong order).
 *   disk.json, regions.map, lock   the streaming disk's own (see streaming/open.ts).
 *
 * Ordering, and why:
 *  - create writes spec.json *before* opening the disk: a daemon killed in between finds
 *    the spec at start-up and finishes what the caller asked for (a retried create then
 *    answers 200). A create that fails removes the directory it made.
 *  - delete closes the export, then the disk (which commits the map). Without wipe it
 *    then removes spec.json and the state directory: the disk is forgotten.
 *  - delete with wipe, after closing: spec.json is rewritten with `wipe_pending` (the wipe
 *    is now owed, whatever happens next), the region map and every other file but
 *    spec.json and disk.json are removed, and only then is the target wiped; spec.json and
 *    the directory go last, and only then does the disk answer 404. A wipe before the map
 *    is gone could leave, after a crash, a map that says `local` over zeroed data; a
 *    forget before the wipe has succeeded would report a disk clean that is not (a retried
 *    DELETE would get 404). So a wipe that fails leaves the disk listed, state `wiping`
 *    with `last_error`, not exported, its target refused to any other disk; a DELETE
 *    (with or without wipe: an owed wipe is never cancelled) tries it again, and so does
 *    a daemon that starts and finds `wipe_pending`.
 *  - every operation on one id runs under that id's lock (create, delete, hydration
 *    changes and the background re-open), so two of them never see a half-built disk.
 *
 * A disk whose origin cannot be reached when the daemon starts is still listed (state
 * `failed`, `last_error` says why) and is re-opened every `reopen_interval_ms` until it
 * opens. Source headers are never returned or logged; URLs are shown redacted.
 */
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import type { Logger } from 'pino';
import type { components } from '../../../openapi/generated/dpu-agent.js';
import { type DeviceIdentity, deviceIdentity } from '../../../common/src/device-identity.js';
import { DpuError } from '../../../image-access/src/errors.js';
import { fsyncDir, writeFileAtomic, writeJsonAtomic } from '../local/atomic-file.js';
import { blockDeviceSize } from '../local/target.js';
import { Manifest } from '../../../image-access/src/manifest.js';
import { writeConfigDrive } from '../streaming/config-drive.js';
import { applyReplay, type BootRecorder, bootProfileStatus, recordBoot, type RecordedProfile, type RecordingState, replayLocal, replayProblem, type ReplayStatus } from '../streaming/boot-profile.js';
import { type Endpoint, NbdServer } from '../nbd/server.js';
import type { NbdTls } from '../nbd/tls.js';
import { countHostRequests, HostActivity } from '../block/host-activity.js';
import { RegionState } from '../region/region-map.js';
import { redactUrl } from '../../../image-access/src/redact.js';
import { noop } from '../../../common/src/deferred.js';
import type { StreamingDisk } from '../streaming/disk.js';
import { type ImageFormat, openStreamingDisk, type OpenedDisk } from '../streaming/open.js';
import { type PeerAddress, PEER_MAX_BYTES } from '../streaming/peer-source.js';
import { HashWorkers } from '../../../image-access/src/hash-workers.js';
import { type AgentConfig, agentNbdTls, agentPeerCa } from './config.js';
import { ErasureManager } from './erasures.js';
import { presentedToken, tokenAccepted } from '../../../openapi/server.js';
import { resolveTarget, targetKey } from './targets.js';

export type DiskView = components['schemas']['Disk'];
export type DiskCreate = components['schemas']['DiskCreate'];
export type PeerList = components['schemas']['PeerList'];

export type HydrationUpdate = components['schemas']['HydrationUpdate'];
export type SourceUpdate = components['schemas']['SourceUpdate'];
export type RegionMapView = components['schemas']['RegionMap'];
export type BootProfileView = components['schemas']['BootProfile'];
type DiskBootProfileView = components['schemas']['DiskBootProfile'];

/** spec.json: the create request with every default filled in. */
export interface DiskSpec {
  version: 1;
  id: string;
  created_at: string;
  /** `format` is absent for raw (and in specs written before qcow2 support). */
  source: { url: string; headers: Record<string, string>; identity?: string; format?: Exclude<ImageFormat, 'raw'> };
  target: { path: string };
  region_size: number;
  /** The emulated disk's size (the root disk); absent: the target device's, else the image's. */
  size?: number;
  /** What the emulated NVMe disk presents (absent in specs written before it existed: derived from the id). */
  device?: DeviceIdentity;
  export: { kind: 'unix' | 'tcp'; name: string; host?: string; port?: number };
  hydration: { enabled: boolean; paused: boolean; bandwidth: number; await_manifest_ms?: number };
  /** Absent in specs written before boot profiles: nothing recorded, nothing replayed. */
  boot_profile?: { record: boolean; replay?: { region_size: number; regions: number[]; boots?: number } };
  /** Set by a delete with wipe; the disk is never opened again, and goes once the target is wiped. */
  wipe_pending?: { requested_at: string };
  /** Offered to peer agents with this bearer token (absent: not offered; docs/fleet.md). */
  peers?: { token: string };
}

/** Per-disk numbers for the metrics endpoint. */
export interface DiskMetrics {
  id: string;
  regionsTotal: number;
  regionsLocal: number;
  bytesFetched: number;
  fetchRetries: number;
  blockMisses: number;
  blockBytesFetched: number;
  hydrationRunning: boolean;
  complete: boolean;
  failed: boolean;
  failedRegions: number;
  wipePending: boolean;
  profileRecording: boolean;
  profileRecordedRegions: number;
  profileReplayRegions: number;
  profileReplayLocal: number;
}

export interface DiskManagerOptions {
  config: Readonly<AgentConfig>;
  log: Logger;
}

const RATE_WINDOW_MS = 5_000;
const RATE_SAMPLE_MS = 1_000;
const WIPE_BYTES = 1 << 20;
/** How long a peer read waits in the queue for a slot (peers.max_queued) before 503: well under a peer's 5 s stall limit. */
const PEER_QUEUE_MS = 2_000;
const MANIFEST_FILE = 'manifest.bin';
/** The config drive written onto the disk (its place and hash), once it is durable. */
const CONFIG_DRIVE_FILE = 'config-drive.json';
type ConfigDriveRecord = NonNullable<DiskView['config_drive']>;
const VERIFYING_FILE = 'manifest.verifying';
const BOOT_PROFILE_FILE = 'boot-profile.json';
/** What a disk whose wipe is pending keeps in its directory: the spec (with the pending wipe) and disk.json (its size, for the view). */
const KEPT_WHILE_WIPING = new Set(['spec.json', 'disk.json']);
/** sockaddr_un.sun_path holds 108 bytes with the terminating NUL. */
const MAX_SOCKET_PATH = 107;
const RLE_CHAR: Record<number, string> = { [RegionState.Remote]: 'r', [RegionState.Zero]: 'z', [RegionState.Filling]: 'f', [RegionState.Local]: 'L' };

/** bytes_fetched samples over the last few seconds, for fetch_rate_bps. */
class RateWindow {
  private samples: { t: number; bytes: number }[] = [];

  sample(t: number, bytes: number): void {
    const last = this.samples[this.samples.length - 1];
    if (last && bytes < last.bytes) this.samples = []; // the disk was reopened: a new source counts from 0
    this.samples.push({ t, bytes });
    while (this.samples.length > 2 && this.samples[0]!.t < t - RATE_WINDOW_MS) this.samples.shift();
  }

  rate(): number {
    const first = this.samples[0];
    const last = this.samples[this.samples.length - 1];
    if (!first || !last || last.t <= first.t) return 0;
    return Math.max(0, Math.round(((last.bytes - first.bytes) * 1000) / (last.t - first.t)));
  }
}

class ManagedDisk {
  opened: OpenedDisk | null = null;
  server: NbdServer | null = null;
  exportInfo: DiskView['export'];
  lastError: string | null = null;
  /** disk.json's geometry and identity, once the disk has been opened (for a failed disk's view). */
  record: { size: number; imageSize: number; regionSize: number; identity: string } | null;
  /** The config drive written onto the disk, or null. */
  configDrive: ConfigDriveRecord | null;
  readonly rate = new RateWindow();
  retryTimer: NodeJS.Timeout | null = null;
  /** Set while the background copy waits for the manifest (hydration.await_manifest_ms). */
  manifestWait: NodeJS.Timeout | null = null;
  removed = false;
  /** Deleted with wipe, and the wipe has not succeeded yet (spec.wipe_pending is on disk). */
  wiping: boolean;
  /** The boot profile being recorded, or null (see bootProfiles). */
  recorder: BootRecorder | null = null;
  /** The finished recording (boot-profile.json), or null. */
  recorded: RecordedProfile | null;
  /** What the recording is when neither of the above says: off, or interrupted by a restart. */
  recordingState: RecordingState | 'off' | 'interrupted' = 'off';
  /** The profile replayed on this disk: its regions (when applied), and what became of it. */
  replay: ReplayStatus = { state: 'none', regions: [], count: 0, error: null };
  /** Bytes served to peer agents since this process started. */
  peerBytes = 0;
  /** The peers to read from before the origin (PUT …/peers); applied again when the disk is reopened. */
  peerSources: PeerAddress[] = [];
  /** PUT …/peers origin_wait_ms (kept with the list, in memory). */
  originWaitMs = 0;

  constructor(
    public spec: DiskSpec,
    readonly dir: string,
    socketPath: string,
    tcpTls: boolean,
  ) {
    this.record = readDiskRecord(dir);
    this.configDrive = readConfigDriveRecord(dir);
    this.recorded = readRecordedProfile(dir);
    this.wiping = spec.wipe_pending !== undefined;
    this.removed = this.wiping;
    const { kind, name, host, port } = spec.export;
    this.exportInfo =
      kind === 'unix'
        ? { uri: unixUri(name, socketPath), name, socket: socketPath }
        : { uri: port ? tcpUri(name, host!, port, tcpTls) : '', name, ...(host !== undefined ? { host } : {}), ...(port ? { port } : {}) };
  }
}

export class DiskManager {
  private readonly config: Readonly<AgentConfig>;
  private readonly log: Logger;
  /** TLS of every TCP export (config key nbd_tls); unix exports never use it. */
  private readonly tcpTls: NbdTls | undefined;
  /** What https:// peers' certificates must chain to (peers.ca); undefined: the system's store. */
  private readonly peerCa: Buffer | undefined;
  private readonly disks = new Map<string, ManagedDisk>();
  private readonly locks = new Map<string, Promise<unknown>>();
  private readonly disksDir: string;
  /** Targets of disks being created (between the checks and the open), by targetKey: erasures must not start on them. */
  private readonly opening = new Map<string, string>();
  private sampler: NodeJS.Timeout | null = null;
  private closing = false;
  /** Peer reads being served, across all disks (peers.max_inflight). */
  private peerReads = 0;
  /** The host's NBD requests in flight on every disk here: serving peers waits for a pause in them (peers.host_yield_ms). */
  readonly hostActivity = new HostActivity();
  /** Peer reads waiting for a slot, oldest first: each is handed a slot as one is released. */
  private readonly peerQueue: (() => void)[] = [];
  /** Erasures of targets no disk uses (erasures.ts); they and the disks never share a target. */
  readonly erasures: ErasureManager;
  /** Verify every disk's fetched regions off the event loop (config hash_threads). */
  private readonly hashWorkers: HashWorkers | undefined;

  constructor(opts: DiskManagerOptions) {
    this.config = opts.config;
    this.log = opts.log;
    this.tcpTls = agentNbdTls(opts.config);
    this.peerCa = agentPeerCa(opts.config);
    this.disksDir = path.join(opts.config.state_dir, 'disks');
    this.erasures = new ErasureManager({ config: opts.config, log: opts.log, targets: this });
    this.hashWorkers = opts.config.hash_threads > 0 ? new HashWorkers(opts.config.hash_threads) : undefined;
  }

  /** The disk that uses a target (a targetKey): one listed, waiting for its wipe, or being created. */
  targetUser(key: string): { id: string; wiping: boolean } | null {
    for (const m of this.disks.values()) if (targetKey(m.spec.target.path) === key) return { id: m.spec.id, wiping: m.wiping };
    const creating = this.opening.get(key);
    return creating !== undefined ? { id: creating, wiping: false } : null;
  }

  get count(): number {
    return this.disks.size;
  }

  /** Creates the directories and resumes every disk found under state_dir. */
  async start(): Promise<void> {
    fs.mkdirSync(this.disksDir, { recursive: true, mode: 0o700 });
    fs.mkdirSync(this.config.export_dir, { recursive: true, mode: 0o750 });
    this.erasures.start();
    for (const id of fs.readdirSync(this.disksDir).sort()) {
      const dir = path.join(this.disksDir, id);
      let spec: DiskSpec;
      try {
        spec = JSON.parse(fs.readFileSync(path.join(dir, 'spec.json'), 'utf8')) as DiskSpec;
        if (spec.version !== 1 || spec.id !== id) throw new Error(`spec.json is for "${String(spec.id)}", version ${String(spec.version)}`);
      } catch (err) {
        this.log.error({ dir, err: (err as Error).message }, 'not resuming a state directory without a readable spec.json; move it away');
        continue;
      }
      this.disks.set(id, new ManagedDisk(spec, dir, this.socketPath(id), this.tcpTls !== undefined));
    }
    // A disk whose wipe is pending is not opened again: its wipe is finished instead (a failure is logged and kept in last_error).
    await Promise.all([...this.disks.values()].map((m) => this.exclusive(m.spec.id, () => (m.wiping ? this.finishWipe(m) : this.tryOpen(m))).catch(noop)));
    this.sampler = setInterval(() => this.sampleRates(), RATE_SAMPLE_MS);
    this.sampler.unref();
    if (this.disks.size) {
      const all = [...this.disks.values()];
      this.log.info({ disks: all.length, failed: all.filter((m) => !m.opened && !m.wiping).length, wiping: all.filter((m) => m.wiping).length }, 'disks resumed');
    }
  }

  list(): DiskView[] {
    return [...this.disks.values()].map((m) => this.view(m));
  }

  get(id: string): DiskView {
    return this.view(this.find(id));
  }

  /** Creates and exports a disk; `created` is false when an identical one existed. */
  async create(req: DiskCreate): Promise<{ disk: DiskView; created: boolean }> {
    const spec = this.normalise(req);
    return this.exclusive(spec.id, async () => {
      if (this.closing) throw new DpuError('DPU_ERR_SHUTTING_DOWN', 'the agent is stopping');
      const existing = this.disks.get(spec.id);
      if (existing?.wiping) throw new DpuError('DPU_ERR_DISK_WIPING', `disk "${spec.id}" was deleted and its target ${existing.spec.target.path} is not wiped yet; DELETE it again to retry the wipe`);
      if (existing) {
        if (sourceKey(existing.spec) === sourceKey(spec) && existing.spec.target.path === spec.target.path) {
          // The same disk, unless the request asks for another geometry or identity.
          if (req.size !== undefined && req.size !== existing.spec.size) {
            throw new DpuError('DPU_ERR_DISK_EXISTS', `disk "${spec.id}" exists with ${existing.spec.size ?? 'the image\'s'} bytes, not ${req.size}; delete it first or choose another id`, { field: 'size' });
          }
          const had = existing.spec.device ?? deviceIdentity(existing.spec.id);
          const diff = (Object.keys(req.device ?? {}) as (keyof DeviceIdentity)[]).find((k) => req.device![k] !== had[k]);
          if (diff) throw new DpuError('DPU_ERR_DISK_EXISTS', `disk "${spec.id}" exists with device.${diff} "${had[diff]}", not "${req.device![diff]}"; delete it first or choose another id`, { field: `device.${diff}` });
          return { disk: this.view(existing), created: false };
        }
        throw new DpuError(
          'DPU_ERR_DISK_EXISTS',
          `disk "${spec.id}" streams ${describeSource(existing.spec)} to ${existing.spec.target.path}; delete it first or choose another id`,
        );
      }
      for (const other of this.disks.values()) {
        if (other.spec.target.path !== spec.target.path) continue;
        if (other.wiping) throw new DpuError('DPU_ERR_DISK_WIPING', `${spec.target.path} is not wiped yet since disk "${other.spec.id}" was deleted; DELETE that disk again to retry the wipe`, { field: 'target.path' });
        throw new DpuError('DPU_ERR_TARGET_IN_USE', `${spec.target.path} is the target of disk "${other.spec.id}"`, { field: 'target.path' });
      }
      const key = targetKey(spec.target.path);
      const erasure = this.erasures.erasing(key);
      if (erasure) throw new DpuError('DPU_ERR_TARGET_ERASING', `${spec.target.path} is being erased (erasure "${erasure.id}", ${erasure.mode}); create the disk once it has ended`, { field: 'target.path' });
      if (this.opening.has(key)) throw new DpuError('DPU_ERR_TARGET_IN_USE', `${spec.target.path} is the target of disk "${this.opening.get(key)!}", being created`, { field: 'target.path' });
      const dir = path.join(this.disksDir, spec.id);
      const fresh = !fs.existsSync(dir);
      fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
      writeJsonAtomic(path.join(dir, 'spec.json'), spec);
      // A directory left by an earlier disk of this id keeps no recording of that disk's boot.
      fs.rmSync(path.join(dir, BOOT_PROFILE_FILE), { force: true });
      const m = new ManagedDisk(spec, dir, this.socketPath(spec.id), this.tcpTls !== undefined);
      this.opening.set(key, spec.id);
      try {
        if (!spec.target.path.startsWith('/dev/')) fs.mkdirSync(path.dirname(spec.target.path), { recursive: true, mode: 0o750 });
        await this.open(m, true);
      } catch (err) {
        // Leave a directory that held a disk before (a complete copy, say) as it was.
        if (fresh) fs.rmSync(dir, { recursive: true, force: true });
        else fs.rmSync(path.join(dir, 'spec.json'), { force: true });
        throw err;
      } finally {
        this.opening.delete(key);
      }
      this.disks.set(spec.id, m);
      this.log.info({ disk: spec.id, source: redactUrl(spec.source.url), target: spec.target.path, export: m.exportInfo.uri }, 'disk created');
      return { disk: this.view(m), created: true };
    });
  }

  /**
   * Stops exporting a disk and forgets it; with `wipe`, destroys the target's data first
   * and forgets it only once that succeeded (DPU_ERR_WIPE_FAILED otherwise: the disk stays,
   * state `wiping`). A disk whose wipe is pending is wiped by any DELETE.
   */
  async delete(id: string, wipe: boolean): Promise<DiskView> {
    return this.exclusive(id, async () => {
      const m = this.find(id);
      const last = this.view(m);
      if (!m.wiping) {
        m.removed = true;
        if (m.retryTimer) clearTimeout(m.retryTimer);
        this.stopManifestWait(m);
        try {
          await this.closeDisk(m);
        } catch (err) {
          this.log.error({ disk: id, err }, 'closing the disk failed; deleting it anyway');
        }
        if (!wipe) {
          this.disks.delete(id);
          // spec.json first: once it is gone the disk is forgotten, whatever happens next.
          fs.rmSync(path.join(m.dir, 'spec.json'), { force: true });
          fs.rmSync(m.dir, { recursive: true, force: true });
          this.log.info({ disk: id, wipe }, 'disk deleted');
          return last;
        }
        // The wipe is owed from here on, across a crash or a restart: written before anything is destroyed.
        m.spec = { ...m.spec, wipe_pending: { requested_at: new Date().toISOString() } };
        writeJsonAtomic(path.join(m.dir, 'spec.json'), m.spec);
        m.wiping = true;
      } else if (!wipe) {
        this.log.info({ disk: id }, 'DELETE without wipe of a disk whose wipe is pending: wiping it all the same');
      }
      await this.finishWipe(m);
      this.log.info({ disk: id, wipe: true }, 'disk deleted');
      return last;
    });
  }

  /**
   * Finishes a delete with wipe (under the disk's lock): removes the region map and the
   * rest of the disk's state, wipes the target, and only then forgets the disk. On failure
   * the disk stays, state `wiping`, with the reason in last_error.
   */
  private async finishWipe(m: ManagedDisk): Promise<void> {
    try {
      for (const name of fs.existsSync(m.dir) ? fs.readdirSync(m.dir) : []) if (!KEPT_WHILE_WIPING.has(name)) fs.rmSync(path.join(m.dir, name), { recursive: true, force: true });
      await this.wipeTarget(m.spec.target.path);
    } catch (err) {
      const e = err instanceof DpuError ? err : new DpuError('DPU_ERR_WIPE_FAILED', `removing the state of disk "${m.spec.id}": ${(err as Error).message}`, { cause: err });
      m.lastError = e.message;
      this.log.error({ disk: m.spec.id, target: m.spec.target.path, err: e.message }, 'wipe failed; the disk stays listed (wiping) until a DELETE wipes it');
      throw e;
    }
    m.lastError = null;
    this.disks.delete(m.spec.id);
    fs.rmSync(path.join(m.dir, 'spec.json'), { force: true });
    fs.rmSync(m.dir, { recursive: true, force: true });
  }

  regionMap(id: string): RegionMapView {
    const m = this.findLive(id);
    if (!m.opened) throw new DpuError('DPU_ERR_DISK_FAILED', `disk "${id}" could not be opened (${m.lastError ?? 'unknown error'}); it is retried in the background`);
    const map = m.opened.disk.map;
    return { region_size: map.regionSize, count: map.count, encoding: 'rle', map: encodeRle(map.states) };
  }

  async setHydration(id: string, update: HydrationUpdate): Promise<DiskView> {
    return this.exclusive(id, async () => {
      const m = this.findLive(id);
      const h = m.opened?.hydrator;
      const next = { ...m.spec.hydration };
      if (update.bandwidth !== undefined) {
        next.bandwidth = update.bandwidth;
        h?.setBandwidth(update.bandwidth);
      }
      if (update.paused === true) {
        next.paused = true;
        h?.pause();
      } else if (update.paused === false) {
        // Resuming a disk created with hydration disabled enables it.
        next.paused = false;
        next.enabled = true;
        this.stopManifestWait(m); // asked to copy now
        h?.resume();
      }
      m.spec = { ...m.spec, hydration: next };
      writeJsonAtomic(path.join(m.dir, 'spec.json'), m.spec);
      this.log.info({ disk: id, hydration: next }, 'hydration changed');
      return this.view(m);
    });
  }

  /**
   * Points the disk at a new URL of the same image (a renewed temp URL). spec.json first,
   * so that a restart uses the new URL whatever happens next; then the open source.
   */
  async setSource(id: string, update: SourceUpdate): Promise<DiskView> {
    return this.exclusive(id, async () => {
      const m = this.findLive(id);
      const identity = m.spec.source.identity ?? m.record?.identity;
      if (update.identity !== undefined && identity !== undefined && update.identity !== identity) {
        throw new DpuError('DPU_ERR_SOURCE_MISMATCH', `disk "${id}" streams image "${identity}", not "${update.identity}"; create another disk for another image`, { field: 'identity' });
      }
      const headers = update.headers ? { ...update.headers } : m.spec.source.headers;
      m.opened?.origin?.setUrl(update.url, headers); // validates the URL before anything is written
      // A new URL may serve what the old one corrupted: fetch those regions again.
      m.opened?.disk.retryFailedRegions();
      if (m.spec.hydration.enabled && !m.spec.hydration.paused) m.opened?.hydrator.retry();
      m.spec = { ...m.spec, source: { ...m.spec.source, url: update.url, headers } };
      writeJsonAtomic(path.join(m.dir, 'spec.json'), m.spec);
      this.log.info({ disk: id, source: redactUrl(update.url) }, 'source URL replaced');
      if (!m.opened && !m.removed) {
        // It may have failed to open because the old URL had expired: try the new one now.
        if (m.retryTimer) clearTimeout(m.retryTimer);
        m.retryTimer = null;
        await this.tryOpen(m);
      }
      return this.view(m);
    });
  }

  /**
   * Verifies the disk's fetched regions with `body` (an encoded image-access/src/manifest.ts) from
   * now on, and stops fetching its zero regions. Checked against the disk's size and
   * region size first; then written to manifest.bin (so a restart re-applies it), then
   * applied to the open disk. A disk that is not open (yet) gets it when it opens.
   */
  async setManifest(id: string, body: Buffer): Promise<DiskView> {
    return this.exclusive(id, async () => {
      const m = this.findLive(id);
      const manifest = Manifest.decode(body);
      const p = m.opened?.disk.progress();
      const size = p?.size ?? m.record?.size;
      const imageSize = p?.imageSize ?? m.record?.imageSize;
      const regionSize = p?.regionSize ?? m.record?.regionSize ?? m.spec.region_size;
      if (size === undefined) throw new DpuError('DPU_ERR_DISK_FAILED', `disk "${id}" has never been opened, so its size is unknown; upload the manifest once it is`);
      // Checking a complete disk would make a region that fails the check remote with no
      // source left to fetch it from: the host's reads of it would fail.
      if (m.opened?.disk.complete && !m.opened.disk.hasManifest) {
        throw new DpuError('DPU_ERR_DISK_COMPLETE', `disk "${id}" is complete: its image source is dropped, so a region failing the manifest could not be fetched again; a manifest is for a disk still copying (create the next disk of this image with it)`);
      }
      // The image's manifest: on a disk larger than its image, the disk pads it (zeros after the image).
      if ((manifest.size !== size && manifest.size !== imageSize) || manifest.regionSize !== regionSize) {
        throw new DpuError('DPU_ERR_MANIFEST_INVALID', `the manifest describes ${manifest.size} bytes in ${manifest.regionSize}-byte regions; disk "${id}" holds a ${imageSize ?? size}-byte image in ${regionSize}-byte regions`);
      }
      // The marker first: a crash before the read-back pass ends makes the next open run it again.
      writeFileAtomic(path.join(m.dir, VERIFYING_FILE), Buffer.alloc(0));
      writeFileAtomic(path.join(m.dir, MANIFEST_FILE), body);
      const disk = m.opened?.disk;
      if (disk) {
        const pass = disk.setManifest(manifest);
        if (m.manifestWait) {
          this.stopManifestWait(m);
          if (m.spec.hydration.enabled && !m.spec.hydration.paused) m.opened!.hydrator.start();
        }
        // The answer does not wait for the read-back: `verified` turns true when it ends.
        pass.then(
          () => this.verificationDone(m, disk),
          (err: Error) => this.log.error({ disk: id, err: err.message }, 'verifying local regions against the manifest failed'),
        );
      }
      this.log.info({ disk: id, regions: manifest.count, zero: manifest.zeroRegions, imageHash: `${manifest.imageHashAlgo}:${manifest.imageHash.toString('hex').slice(0, 16)}…` }, 'manifest set: fetched regions are verified');
      return this.view(m);
    });
  }

  /**
   * Writes `drive` (the config drive's ISO) onto the disk as ironic-python-agent would
   * (streaming/config-drive.ts), durably, then records where: the same drive again is
   * answered from the record without writing. The driver does it before the host boots.
   */
  async setConfigDrive(id: string, drive: Buffer): Promise<DiskView> {
    return this.exclusive(id, async () => {
      const m = this.findLive(id);
      const sha256 = createHash('sha256').update(drive).digest('hex');
      if (m.configDrive?.sha256 === sha256) return this.view(m);
      const disk = m.opened?.disk;
      if (!disk) throw new DpuError('DPU_ERR_DISK_FAILED', `disk "${id}" is not open${m.lastError ? ` (${m.lastError})` : ''}; write the config drive once it is`);
      // The agent's own reads of the partition table are not the host's boot.
      const recorder = m.recorder;
      const placed = recorder ? await recorder.unrecorded(() => writeConfigDrive(disk, drive)) : await writeConfigDrive(disk, drive);
      const record: ConfigDriveRecord = { ...placed, bytes: drive.length, sha256, written_at: new Date().toISOString() };
      writeJsonAtomic(path.join(m.dir, CONFIG_DRIVE_FILE), record);
      m.configDrive = record;
      this.log.info({ disk: id, ...record }, 'config drive written');
      return this.view(m);
    });
  }

  /** The read-back pass of `disk` ended: drop the marker, unless the disk was reopened since. */
  private verificationDone(m: ManagedDisk, disk: StreamingDisk): void {
    if (m.opened?.disk !== disk || m.removed) return;
    fs.rmSync(path.join(m.dir, VERIFYING_FILE), { force: true });
  }

  metrics(): DiskMetrics[] {
    return [...this.disks.values()].map((m) => {
      const p = m.opened?.disk.progress();
      return {
        id: m.spec.id,
        regionsTotal: p?.regionsTotal ?? 0,
        regionsLocal: p?.regionsLocal ?? 0,
        bytesFetched: p?.bytesFetched ?? 0,
        fetchRetries: p?.fetchRetries ?? 0,
        blockMisses: p?.blockMisses ?? 0,
        blockBytesFetched: p?.blockBytesFetched ?? 0,
        hydrationRunning: m.opened?.hydrator.state === 'running',
        complete: p?.complete ?? false,
        failed: (!m.opened || (p?.failed ?? false)) && !m.wiping,
        failedRegions: p?.failedRegions ?? 0,
        wipePending: m.wiping,
        profileRecording: m.recorder?.state === 'recording',
        profileRecordedRegions: m.recorder?.regionCount ?? m.recorded?.regions.length ?? 0,
        profileReplayRegions: m.replay.state === 'applied' ? m.replay.count : 0,
        profileReplayLocal: this.replayLocal(m),
      };
    });
  }

  /** Closes every disk (each commits its map); the state stays for the next start. */
  async close(): Promise<void> {
    this.closing = true;
    if (this.sampler) clearInterval(this.sampler);
    await this.erasures.close();
    await Promise.all(
      [...this.disks.values()].map((m) => {
        if (m.retryTimer) clearTimeout(m.retryTimer);
        this.stopManifestWait(m);
        return this.exclusive(m.spec.id, () => this.closeDisk(m)).catch((err: Error) => this.log.error({ disk: m.spec.id, err }, 'closing the disk failed'));
      }),
    );
    await this.hashWorkers?.close();
  }

  // ---- internals ---------------------------------------------------------------------

  /** Replaces the peers disk `id` reads from before the origin (PUT /v1/disks/{id}/peers). */
  async setPeers(id: string, list: PeerList): Promise<DiskView> {
    return this.exclusive(id, async () => {
      const m = this.findLive(id);
      if (!m.spec.peers) throw new DpuError('DPU_ERR_PEER_REFUSED', `disk "${id}" was created without peers.token: create it with one to read from peers`);
      m.peerSources = list.sources.map((p) => ({ url: p.url, disk: p.disk }));
      m.originWaitMs = list.origin_wait_ms ?? 0;
      m.opened?.peers?.setPeers(m.peerSources, m.spec.peers.token, m.originWaitMs);
      this.log.info({ disk: id, peers: m.peerSources.length }, 'peer list replaced');
      return this.view(m);
    });
  }

  /**
   * Bytes of disk `id`'s image for a peer agent (GET /v1/disks/{id}/image): checks the
   * disk's peer token first (constant time; an unknown disk, one not offered and a wrong
   * token are the same 401, so nothing is learnt without the token), one `Range` of at most
   * PEER_MAX_BYTES within the image, and reads only verified image bytes
   * (StreamingDisk.readForPeer). At most peers.max_inflight reads across all disks hold a
   * slot, from the read until the answer has been sent (`release`, once); `sent` counts
   * the bytes as served, once the answer has gone out whole.
   */
  async readForPeer(id: string, authorization: string | undefined, range: string | undefined): Promise<{ data: Buffer; start: number; end: number; size: number; release: () => void; sent: () => void }> {
    const { m, disk } = this.peerDisk(id, authorization);
    const size = disk.imageSize;
    const r = /^bytes=(\d+)-(\d+)$/.exec(range ?? '');
    const start = r ? Number(r[1]) : NaN;
    const end = r ? Number(r[2]) : NaN;
    if (!r || !(start <= end) || end >= size || end - start + 1 > PEER_MAX_BYTES) {
      throw new DpuError('DPU_ERR_RANGE', `Range "${range ?? ''}": give one range bytes=a-b within the image's ${size} bytes, at most ${PEER_MAX_BYTES} bytes`);
    }
    await this.peerSlot();
    // The target read waits for a pause in the host's requests (at most host_yield_ms):
    // it competes with them for the thread pool and the target.
    await this.hostActivity.whenQuiet(this.config.peers.host_yield_ms);
    let held = true;
    const release = (): void => {
      if (!held) return;
      held = false;
      // The slot goes to the oldest waiting read as it is, so no newcomer takes it first.
      const next = this.peerQueue.shift();
      if (next) next();
      else this.peerReads--;
    };
    try {
      const data = Buffer.allocUnsafe(end - start + 1);
      if (!(await disk.readForPeer(start, data))) {
        throw new DpuError('DPU_ERR_NOT_SERVABLE', `bytes ${start}-${end} of disk "${id}" are not all verified image bytes here (not local yet, not verified, or written by the host): read them from the origin`);
      }
      // Counted once the answer has gone out whole (`sent`): a peer that went away before
      // took nothing, and `bytes_served` must match what peers took.
      let counted = false;
      const sent = (): void => {
        if (counted) return;
        counted = true;
        m.peerBytes += data.length;
      };
      return { data, start, end, size, release, sent };
    } catch (err) {
      release();
      throw err;
    }
  }

  /**
   * One of peers.max_inflight slots for a peer read: at once if one is free, else after
   * the reads queued before it (at most peers.max_queued wait, each PEER_QUEUE_MS at most);
   * DPU_ERR_BUSY otherwise.
   */
  private async peerSlot(): Promise<void> {
    const { max_inflight: slots, max_queued: queued } = this.config.peers;
    if (this.peerReads < slots) {
      this.peerReads++;
      return;
    }
    const busy = (): DpuError => new DpuError('DPU_ERR_BUSY', `${this.peerReads} peer reads in flight (peers.max_inflight) and ${this.peerQueue.length} waiting (peers.max_queued): ask another peer`);
    if (this.peerQueue.length >= queued) throw busy();
    await new Promise<void>((resolve, reject) => {
      const granted = (): void => {
        clearTimeout(timer);
        resolve();
      };
      const timer = setTimeout(() => {
        const i = this.peerQueue.indexOf(granted);
        if (i >= 0) this.peerQueue.splice(i, 1);
        reject(busy());
      }, PEER_QUEUE_MS);
      this.peerQueue.push(granted);
    });
  }

  /** Peer reads holding a serving slot and waiting for one (peers.max_inflight, peers.max_queued). */
  peerServing(): { inflight: number; queued: number } {
    return { inflight: this.peerReads, queued: this.peerQueue.length };
  }

  /** Which regions readForPeer serves now (GET /v1/disks/{id}/image/regions), authenticated as it is. */
  peerRegions(id: string, authorization: string | undefined): { region_size: number; regions: number; runs: number[]; complete: boolean } {
    const { disk } = this.peerDisk(id, authorization);
    return { region_size: disk.map.regionSize, regions: disk.map.count, runs: disk.pristineRuns(), complete: disk.servesAll() };
  }

  /**
   * The open disk a peer asks for, once its peer token is checked (constant time; an
   * unknown disk, one not offered and a wrong token are the same 401, so nothing is learnt
   * without the token).
   */
  private peerDisk(id: string, authorization: string | undefined): { m: ManagedDisk; disk: StreamingDisk } {
    const m = this.disks.get(id);
    const token = m?.spec.peers?.token;
    if (!m || token === undefined || !tokenAccepted(presentedToken(authorization), [Buffer.from(token)])) {
      throw new DpuError('DPU_ERR_UNAUTHORIZED', `not a peer token of disk "${id}" (or no such disk is offered to peers)`);
    }
    const disk = m.opened?.disk;
    if (!disk || m.wiping) throw new DpuError('DPU_ERR_NOT_SERVABLE', `disk "${id}" is not open`);
    return { m, disk };
  }

  private find(id: string): ManagedDisk {
    const m = this.disks.get(id);
    if (!m) throw new DpuError('DPU_ERR_NOT_FOUND', `no disk "${id}"`);
    return m;
  }

  /** A disk that is not waiting for its wipe: the only kind that may be changed or read from. */
  private findLive(id: string): ManagedDisk {
    const m = this.find(id);
    if (m.wiping) throw new DpuError('DPU_ERR_DISK_WIPING', `disk "${id}" was deleted and its target is not wiped yet (${m.lastError ?? 'wiping'}); DELETE it again to retry the wipe`);
    return m;
  }

  /** Runs `fn` after every earlier operation on `id` has finished. */
  private async exclusive<T>(id: string, fn: () => Promise<T>): Promise<T> {
    const run = (this.locks.get(id) ?? Promise.resolve()).then(fn);
    const tail = run.catch(noop);
    this.locks.set(id, tail);
    try {
      return await run;
    } finally {
      if (this.locks.get(id) === tail) this.locks.delete(id);
    }
  }

  private socketPath(id: string): string {
    return path.join(this.config.export_dir, `${id}.sock`);
  }

  /** The request with every default filled in; refuses what the agent's policy forbids. */
  private normalise(req: DiskCreate): DiskSpec {
    const cfg = this.config;
    const given = req.target.path;
    const { path: target, real } = resolveTarget(cfg, given);
    if (real !== null) {
      const st = fs.statSync(real);
      if (!st.isFile() && !st.isBlockDevice()) throw new DpuError('DPU_ERR_BAD_REQUEST', `target.path "${given}" is neither a block device nor a regular file`, { field: 'target.path' });
    }
    const regionSize = req.region_size ?? cfg.defaults.region_size;
    if (regionSize & (regionSize - 1)) throw new DpuError('DPU_ERR_BAD_REQUEST', `region_size ${regionSize} is not a power of two`, { field: 'region_size' });
    const ex = req.export ?? {};
    const kind = ex.kind ?? 'unix';
    if (kind === 'tcp' && !cfg.tcp_exports_allowed) {
      throw new DpuError('DPU_ERR_TCP_EXPORT_NOT_ALLOWED', 'export.kind "tcp" needs tcp_exports_allowed: true in the agent config (NBD over TCP has no authentication); use a unix export', { field: 'export.kind' });
    }
    if (kind === 'unix' && (ex.host !== undefined || ex.port !== undefined)) {
      throw new DpuError('DPU_ERR_BAD_REQUEST', `export.${ex.host !== undefined ? 'host' : 'port'} applies to tcp exports only`, { field: ex.host !== undefined ? 'export.host' : 'export.port' });
    }
    if (kind === 'unix' && Buffer.byteLength(this.socketPath(req.id)) > MAX_SOCKET_PATH) {
      throw new DpuError('DPU_ERR_BAD_REQUEST', `id "${req.id}" is too long for a unix socket path under ${cfg.export_dir}`, { field: 'id' });
    }
    const h = req.hydration;
    const size = req.size ?? targetDeviceSize(real);
    const bp = req.boot_profile;
    if (bp?.replay) {
      // Whether its regions lie in the image is known once the disk is open (see bootProfiles).
      const problem = replayProblem(bp.replay, regionSize, null);
      if (problem) throw problem;
    }
    return {
      version: 1,
      id: req.id,
      created_at: new Date().toISOString(),
      source: {
        url: req.source.url,
        headers: { ...(req.source.headers ?? {}) },
        ...(req.source.identity !== undefined ? { identity: req.source.identity } : {}),
        ...(req.source.format !== undefined && req.source.format !== 'raw' ? { format: req.source.format } : {}),
      },
      target: { path: target },
      region_size: regionSize,
      device: deviceIdentity(req.id, req.device),
      // A whole device is the root disk unless told otherwise; decided once, at creation.
      ...(size !== undefined ? { size } : {}),
      export: { kind, name: ex.name ?? 'disk', ...(kind === 'tcp' ? { host: ex.host ?? '127.0.0.1', port: ex.port ?? 0 } : {}) },
      hydration: h
        ? { enabled: h.enabled ?? true, paused: h.paused ?? cfg.defaults.hydration_paused, bandwidth: h.bandwidth ?? 0, ...(h.await_manifest_ms ? { await_manifest_ms: h.await_manifest_ms } : {}) }
        : { enabled: true, paused: cfg.defaults.hydration_paused, bandwidth: cfg.defaults.bandwidth },
      boot_profile: {
        record: bp?.record ?? true,
        ...(bp?.replay ? { replay: { region_size: bp.replay.region_size, regions: [...bp.replay.regions], ...(bp.replay.boots !== undefined ? { boots: bp.replay.boots } : {}) } } : {}),
      },
      ...(req.peers ? { peers: { token: req.peers.token } } : {}),
    };
  }

  /** Opens the streaming disk and its NBD server, and starts hydration as the spec says. */
  private async open(m: ManagedDisk, created = false): Promise<void> {
    const { spec } = m;
    const d = this.config.defaults;
    const log = this.log.child({ disk: spec.id });
    const manifest = readManifest(m.dir, log);
    const verifyLocalAtOpen = manifest !== null && fs.existsSync(path.join(m.dir, VERIFYING_FILE));
    const diskSize = spec.size;
    const opened = await openStreamingDisk({
      source: {
        url: spec.source.url,
        headers: spec.source.headers,
        ...(spec.source.identity !== undefined ? { identity: spec.source.identity } : {}),
        maxConnections: d.max_connections,
        backgroundConnections: Math.min(d.hydrate_connections, d.max_connections - 1),
        backgroundRequestMs: d.background_request_ms,
        retryDeadlineMs: d.retry_deadline_ms,
        stallTimeoutMs: d.stall_timeout_ms,
        probeDeadlineMs: Math.min(d.open_timeout_ms, d.retry_deadline_ms),
      },
      format: spec.source.format ?? 'raw',
      targetPath: spec.target.path,
      stateDir: m.dir,
      regionSize: spec.region_size,
      ...(diskSize !== undefined ? { diskSize } : {}),
      hydrator: { bandwidth: spec.hydration.bandwidth, batchBytes: d.batch_size, concurrency: d.hydrate_connections },
      commitIntervalMs: d.commit_interval_ms,
      ...(manifest ? { manifest } : {}),
      ...(verifyLocalAtOpen ? { verifyLocalAtOpen } : {}),
      ...(this.hashWorkers ? { hashWorkers: this.hashWorkers } : {}),
      ...(this.peerCa ? { peerCa: this.peerCa } : {}),
      log,
    });
    if (verifyLocalAtOpen) {
      const disk = opened.disk;
      // The constructor started the pass; wait for it on the side (verified stays false meanwhile).
      void disk.whenVerified().then(() => this.verificationDone(m, disk), noop);
    }
    const ep: Endpoint = spec.export.kind === 'tcp' ? { kind: 'tcp', host: spec.export.host ?? '127.0.0.1', port: spec.export.port ?? 0 } : { kind: 'unix', path: this.socketPath(spec.id) };
    const tls = ep.kind === 'tcp' ? this.tcpTls : undefined;
    const server = new NbdServer({ exports: [{ name: spec.export.name, description: `streaming disk ${spec.id}`, backend: countHostRequests(opened.disk, this.hostActivity) }], log, ...(tls ? { tls } : {}) });
    if (ep.kind === 'tcp' && !tls) log.warn('TCP export without TLS: set nbd_tls in the agent config to encrypt it and authenticate hosts');
    let uri: string;
    try {
      uri = await server.listen(ep);
    } catch (err) {
      await opened.close();
      throw err;
    }
    if (ep.kind === 'tcp') {
      const port = Number(new URL(uri.replace(/^nbds?:/, 'http:')).port);
      m.exportInfo = { uri: tcpUri(spec.export.name, ep.host, port, tls !== undefined), name: spec.export.name, host: ep.host, port };
      if (spec.export.port !== port) {
        // A host reconnects to the same port after a daemon restart: keep the one we got.
        m.spec = { ...spec, export: { ...spec.export, port } };
        writeJsonAtomic(path.join(m.dir, 'spec.json'), m.spec);
      }
    }
    m.opened = opened;
    if (m.spec.peers) {
      if (m.peerSources.length) opened.peers?.setPeers(m.peerSources, m.spec.peers.token, m.originWaitMs);
      // Regions local from before the restart are served to peers once read back and verified.
      if (opened.disk.hasManifest) {
        void opened.disk.scanPristine().then(
          (n) => n && this.log.info({ disk: m.spec.id, regions: n }, 'local regions verified for serving peers'),
          (err: unknown) => this.log.warn({ disk: m.spec.id, err: (err as Error).message }, 'reading back local regions for peers failed'),
        );
      }
    }
    m.server = server;
    m.record = readDiskRecord(m.dir);
    m.rate.sample(Date.now(), opened.disk.progress().bytesFetched);
    opened.hydrator.on('batch-error', (err) => {
      m.lastError = err.message;
    });
    opened.disk.on('commit-error', (err) => {
      m.lastError = `committing the region map: ${err.message}`;
    });
    opened.disk.on('failed', (err) => {
      m.lastError = err.message;
    });
    opened.hydrator.on('state', (state) => {
      if (state === 'failed' && opened.hydrator.lastError) m.lastError = opened.hydrator.lastError;
    });
    opened.disk.on('complete', () => {
      m.lastError = null;
      log.info('disk complete: every region is local');
    });
    this.bootProfiles(m, opened, created, log);
    if (spec.hydration.enabled && !spec.hydration.paused) this.startHydration(m, opened, log);
    log.info({ uri: m.exportInfo.uri, regions: opened.disk.map.count, local: opened.disk.map.local, complete: opened.disk.complete }, 'NBD export listening');
  }

  /**
   * Starts the background copy of a disk just opened — unless it was created with
   * hydration.await_manifest_ms and has no manifest yet: then it starts when the manifest
   * is uploaded (setManifest), when hydration is resumed, or after that many ms, whichever
   * comes first. So a disk of a fleet reads its first region from peers, not the origin
   * (peers are asked only once a manifest can verify them). The host's reads go on meanwhile.
   */
  private startHydration(m: ManagedDisk, opened: OpenedDisk, log: Logger): void {
    const wait = m.spec.hydration.await_manifest_ms ?? 0;
    if (wait > 0 && !opened.disk.hasManifest && !opened.disk.complete) {
      this.stopManifestWait(m);
      m.manifestWait = setTimeout(() => {
        m.manifestWait = null;
        if (m.removed || m.opened !== opened || !m.spec.hydration.enabled || m.spec.hydration.paused) return;
        log.warn({ wait_ms: wait }, 'no manifest came within hydration.await_manifest_ms: copying from the origin, unverified');
        opened.hydrator.start();
      }, wait);
      m.manifestWait.unref();
      return;
    }
    opened.hydrator.start();
  }

  private stopManifestWait(m: ManagedDisk): void {
    if (m.manifestWait) clearTimeout(m.manifestWait);
    m.manifestWait = null;
  }

  /**
   * Boot profiles of a disk just opened (streaming/boot-profile.ts): the profile of the
   * request is queued first in the hydrator, before hydration starts (so before the host
   * can be powered on), unless it does not fit the image — then it is refused whole and
   * the disk says why; a profile never fails a disk. Recording starts on a disk created
   * now; a disk resumed after a restart keeps the recording it finished (boot-profile.json)
   * or reports it interrupted. Replay is repeated at every open: regions already local are
   * skipped when their turn comes.
   */
  private bootProfiles(m: ManagedDisk, opened: OpenedDisk, created: boolean, log: Logger): void {
    const cfg = this.config.boot_profiles;
    const bp = m.spec.boot_profile;
    const disk = opened.disk;
    m.replay = { state: 'none', regions: [], count: bp?.replay?.regions.length ?? 0, error: null };
    if (bp?.replay && !cfg.enabled) m.replay.state = 'disabled';
    else if (bp?.replay) m.replay = applyReplay(bp.replay, disk, opened.hydrator, log);
    m.recorder?.detach();
    m.recorder = null;
    if (m.recorded) return; // finished before a restart: kept as it is
    if (!cfg.enabled || !bp || !bp.record) {
      m.recordingState = 'off';
      return;
    }
    if (!created) {
      m.recordingState = 'interrupted';
      return;
    }
    const recorder = recordBoot(disk, { windowMs: cfg.window_ms, maxRegions: cfg.max_regions }, (profile) => {
      m.recorded = profile;
      if (m.recorder === recorder) m.recorder = null;
      // Not on the read that filled the budget: the file is written on a later turn.
      setImmediate(() => {
        if (m.removed || m.wiping) return;
        try {
          writeJsonAtomic(path.join(m.dir, BOOT_PROFILE_FILE), profile);
        } catch (err) {
          log.warn({ err: (err as Error).message }, 'cannot store the recorded boot profile; it is lost at the next restart');
        }
        log.info({ regions: profile.regions.length, stop: profile.stop_reason }, 'boot profile recorded');
      });
    });
    m.recorder = recorder;
  }

  /** The boot profile recorded on the disk (in progress, done, or why there is none). */
  bootProfile(id: string): BootProfileView {
    const m = this.findLive(id);
    if (m.recorder) return m.recorder.view();
    if (m.recorded) return m.recorded;
    const regionSize = m.opened?.disk.map.regionSize ?? m.record?.regionSize ?? m.spec.region_size;
    const imageSize = m.opened?.disk.imageSize ?? m.record?.imageSize ?? 0;
    return { state: m.recordingState, region_size: regionSize, image_regions: Math.ceil(imageSize / regionSize), regions: [], started_at: null, ended_at: null, stop_reason: null };
  }

  private bootProfileView(m: ManagedDisk): DiskBootProfileView {
    return bootProfileStatus(m.recorder, m.recorded, m.recordingState, m.replay, m.opened?.disk.map, m.spec.boot_profile?.replay?.boots ?? null);
  }

  /** Regions of the applied profile that are local or zero (served without the network). */
  private replayLocal(m: ManagedDisk): number {
    return replayLocal(m.opened?.disk.map, m.replay);
  }

  /** For resume: opens, or marks the disk failed and tries again later. */
  private async tryOpen(m: ManagedDisk): Promise<void> {
    if (m.removed || m.opened || this.closing) return;
    try {
      await this.open(m);
      if (m.lastError) this.log.info({ disk: m.spec.id }, 'disk opened after earlier failures');
      m.lastError = null;
    } catch (err) {
      m.lastError = (err as Error).message;
      this.log.warn({ disk: m.spec.id, err: m.lastError, retryInMs: this.config.reopen_interval_ms }, 'cannot open disk; will retry');
      m.retryTimer = setTimeout(() => {
        m.retryTimer = null;
        this.exclusive(m.spec.id, () => this.tryOpen(m)).catch(noop);
      }, this.config.reopen_interval_ms);
      m.retryTimer.unref();
    }
  }

  private async closeDisk(m: ManagedDisk): Promise<void> {
    const { server, opened } = m;
    if (m.recorder) {
      m.recorder.detach(); // a recording cut short is not kept (see bootProfiles)
      m.recorder = null;
      if (!m.recorded) m.recordingState = 'interrupted';
    }
    m.server = null;
    m.opened = null;
    try {
      await server?.close();
    } finally {
      await opened?.close();
    }
  }

  private view(m: ManagedDisk): DiskView {
    const { spec } = m;
    const opened = m.opened;
    const p = opened?.disk.progress();
    const size = p?.size ?? m.record?.size ?? 0;
    const regionSize = p?.regionSize ?? m.record?.regionSize ?? spec.region_size;
    const identity = spec.source.identity ?? m.record?.identity;
    let hydration: DiskView['hydration']['state'];
    if (!opened) hydration = 'stopped';
    else if (p!.complete) hydration = 'complete';
    else if (!spec.hydration.enabled) hydration = 'disabled';
    else hydration = opened.hydrator.state;
    return {
      id: spec.id,
      state: m.wiping ? 'wiping' : !opened || p!.failed ? 'failed' : p!.complete ? 'complete' : 'streaming',
      created_at: spec.created_at,
      source: { url: redactUrl(spec.source.url), ...(identity !== undefined ? { identity } : {}), format: spec.source.format ?? 'raw' },
      target: { path: spec.target.path },
      export: m.exportInfo,
      size,
      image_size: p?.imageSize ?? m.record?.imageSize ?? size,
      device: spec.device ?? deviceIdentity(spec.id),
      config_drive: m.configDrive,
      region_size: regionSize,
      regions: { total: p?.regionsTotal ?? Math.ceil(size / regionSize), local: p?.regionsLocal ?? 0, zero: p?.regionsZero ?? 0, failed: p?.failedRegions ?? 0 },
      bytes_fetched: p?.bytesFetched ?? 0,
      fetch_rate_bps: opened ? m.rate.rate() : 0,
      fetch_retries: p?.fetchRetries ?? 0,
      misses: { blocks: p?.blockMisses ?? 0, block_bytes: p?.blockBytesFetched ?? 0, block_size: opened?.disk.missBlockSize ?? null },
      manifest: p?.hasManifest ?? false,
      verified: p?.verified ?? false,
      integrity_failures: p?.integrityFailures ?? 0,
      hydration: { state: hydration, bandwidth: opened?.hydrator.bandwidth ?? spec.hydration.bandwidth },
      boot_profile: this.bootProfileView(m),
      peers: (() => {
        const ps = opened?.peers?.peerStats();
        return { offered: spec.peers !== undefined, bytes_served: m.peerBytes, sources: m.peerSources.length, excluded: ps?.excluded ?? 0, excluded_sources: ps?.excludedPeers ?? [], bytes_from_peers: ps?.bytesFromPeers ?? 0, fallbacks: ps?.fallbacks ?? 0, fallback_causes: { busy: ps?.fallbackBusy ?? 0, refused: ps?.fallbackRefused ?? 0, failed: ps?.fallbackFailed ?? 0 } };
      })(),
      last_error: m.lastError,
    };
  }

  private sampleRates(): void {
    const now = Date.now();
    for (const m of this.disks.values()) if (m.opened) m.rate.sample(now, m.opened.disk.progress().bytesFetched);
  }

  /**
   * Destroys the target's data, or throws DPU_ERR_WIPE_FAILED. A file is removed. A block
   * device is discarded (`blkdiscard`, when installed and the device supports it) and its
   * first and last MiB — partition tables, RAID and LVM labels — are overwritten with
   * zeros, so the next tenant's firmware finds nothing to boot; it is not a secure erase.
   */
  private async wipeTarget(target: string): Promise<void> {
    let st: fs.Stats;
    try {
      st = fs.statSync(target);
    } catch (err) {
      // Only a target that does not exist has nothing to wipe; any other failure is a failed wipe.
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return;
      throw new DpuError('DPU_ERR_WIPE_FAILED', `wiping ${target}: ${(err as Error).message}`, { cause: err });
    }
    try {
      if (st.isFile()) {
        fs.unlinkSync(target);
        // Durable before the pending wipe is cleared: a crash must not bring the file back without it.
        fsyncDir(path.dirname(target));
      } else if (st.isBlockDevice()) {
        await new Promise<void>((resolve) =>
          execFile('blkdiscard', [target], (err) => {
            if (err) this.log.warn({ target, err: err.message }, 'blkdiscard failed or is not installed; zeroing the first and last MiB only');
            resolve();
          }),
        );
        const size = blockDeviceSize(st.rdev);
        const zeros = Buffer.alloc(Math.min(WIPE_BYTES, size));
        const fd = fs.openSync(target, 'r+');
        try {
          fs.writeSync(fd, zeros, 0, zeros.length, 0);
          fs.writeSync(fd, zeros, 0, zeros.length, size - zeros.length);
          fs.fsyncSync(fd);
        } finally {
          fs.closeSync(fd);
        }
      }
      this.log.info({ target }, 'target wiped');
    } catch (err) {
      throw new DpuError('DPU_ERR_WIPE_FAILED', `wiping ${target}: ${(err as Error).message}`, { cause: err });
    }
  }
}

/** What makes two creates "the same disk": the identity if given, else the URL without its secrets; and the format. */
function sourceKey(spec: DiskSpec): string {
  const key = spec.source.identity !== undefined ? `identity:${spec.source.identity}` : `url:${redactUrl(spec.source.url)}`;
  return spec.source.format ? `${key};format:${spec.source.format}` : key;
}

function describeSource(spec: DiskSpec): string {
  return spec.source.identity !== undefined ? `image "${spec.source.identity}"` : redactUrl(spec.source.url);
}

function unixUri(name: string, socket: string): string {
  return `nbd+unix:///${encodeURIComponent(name)}?socket=${socket}`;
}

function tcpUri(name: string, host: string, port: number, tls: boolean): string {
  return `${tls ? 'nbds' : 'nbd'}://${host.includes(':') ? `[${host}]` : host}:${port}/${encodeURIComponent(name)}`;
}

/** Run-length encoding of region states: "512L3f1533r". */
export function encodeRle(states: Uint8Array): string {
  let out = '';
  let i = 0;
  while (i < states.length) {
    const s = states[i]!;
    let j = i + 1;
    while (j < states.length && states[j] === s) j++;
    out += `${j - i}${RLE_CHAR[s]}`;
    i = j;
  }
  return out;
}

/** The stored manifest, or null (none, or unreadable: then the disk streams unverified and says why in the log). */
function readManifest(dir: string, log: Logger): Manifest | null {
  let buf: Buffer;
  try {
    buf = fs.readFileSync(path.join(dir, MANIFEST_FILE));
  } catch {
    return null;
  }
  try {
    return Manifest.decode(buf);
  } catch (err) {
    log.error({ err: (err as Error).message }, `${MANIFEST_FILE} is unusable: the disk streams unverified until a manifest is uploaded again`);
    return null;
  }
}

/** The recording finished before a restart (boot-profile.json), or null. */
function readRecordedProfile(dir: string): RecordedProfile | null {
  try {
    const p = JSON.parse(fs.readFileSync(path.join(dir, BOOT_PROFILE_FILE), 'utf8')) as RecordedProfile;
    return p.state === 'done' && Array.isArray(p.regions) ? p : null;
  } catch {
    return null;
  }
}

function readConfigDriveRecord(dir: string): ConfigDriveRecord | null {
  try {
    return JSON.parse(fs.readFileSync(path.join(dir, CONFIG_DRIVE_FILE), 'utf8')) as ConfigDriveRecord;
  } catch {
    return null;
  }
}

function readDiskRecord(dir: string): ManagedDisk['record'] {
  try {
    const r = JSON.parse(fs.readFileSync(path.join(dir, 'disk.json'), 'utf8')) as { size: number; imageSize?: number; regionSize: number; identity: string };
    return { size: r.size, imageSize: r.imageSize ?? r.size, regionSize: r.regionSize, identity: r.identity };
  } catch {
    return null;
  }
}


/** The size of a block-device target (a whole root disk by default), or undefined for a file. */
function targetDeviceSize(target: string | null): number | undefined {
  if (target === null) return undefined;
  let st: fs.Stats;
  try {
    st = fs.statSync(target);
  } catch {
    return undefined;
  }
  return st.isBlockDevice() ? blockDeviceSize(st.rdev) : undefined;
}

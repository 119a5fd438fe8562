/**
 * The job processors. Policy, not loops: a processor does one step and lets BullMQ retry
 * it (transient errors, exponential backoff, bounded attempts) or fail it at once
 * (permanent errors, UnrecoverableError). Each writes what happened to the deployment
 * record so the API always says where a deployment stands and why.
 *
 *   attach    resolve the image (Glance, Swift: image.ts) → create the disk on the DPU
 *             agent (idempotent on the disk id) → record the export URI, state `ready` →
 *             enqueue monitor
 *   monitor   one poll of the disk's progress per run; not done yet → renew the image's
 *             temp URL if a third or less of its lifetime is left (the agent gets the new
 *             URL) → the same job is moved to delayed for `monitor_interval_ms` (so no
 *             job runs for minutes, a restart loses nothing, and bull-board shows its
 *             progress)
 *   teardown  delete the disk on the agent (wiping it by default) → remove the record. The
 *             agent answers 200 only once the target is wiped, and keeps a disk whose wipe
 *             failed (state `wiping`, 500 DPU_ERR_WIPE_FAILED, retryable): so the job
 *             retries, then leaves the deployment `failed` with the reason, never removed
 *             over an unwiped disk; a 404 means the agent has no such disk (never created,
 *             or deleted and wiped), and only then is the record removed.
 *   manifest  (manifests.ts) read the image once, check its digest, cache its manifest
 *   clean     (cleaning.ts) start the erasure of the node's DPU target on the agent (POST
 *             /v1/erasures: Ironic's erase_devices_metadata or erase_devices) → one poll
 *             of it per run, moved to delayed between polls as monitor is → done, or
 *             failed with the agent's reason. An erasure the agent reports interrupted
 *             (it restarted meanwhile) or no longer knows is started again, at most
 *             MAX_CLEAN_RESTARTS times: a partly erased target is erased anew, never
 *             reported clean.
 *
 * Manifests: the attach job, once the disk exists, uploads the image's cached manifest
 * or queues its build and goes on (the disk streams unverified meanwhile, and says so in
 * last_error); the monitor job uploads it once it is cached. When verification is
 * required (manifests.require, or driver_info smartnic_require_verification) attach
 * waits for the manifest (moving itself to delayed) before creating the disk, and a
 * manifest that can never be built (the image does not match Glance's digest) fails the
 * deployment.
 *
 * Boot profiles (boot-profiles.ts): attach looks up the image's merged profile (in the
 * region size it asks the agent for) and sends it in the create request, with recording
 * on; once the disk exists it records the profile key in the disk's real region size and
 * what the agent did with the profile (a profile the agent refuses as not fitting the
 * image is deleted: the next boots record a fresh one). The monitor job collects this
 * deployment's recording once the agent says it is `done`; when hydration completes while
 * the host is booting (`recording`) it goes on polling until then (at most
 * boot_profiles.collect_timeout_ms after the deployment was created). A host that had not
 * read anything by then (`waiting`: hydration beat the power-on) does not keep a job
 * polling: the teardown job collects its recording, if done, before deleting the disk.
 * Nothing about profiles ever fails or delays a job: an error is a note on the deployment.
 *
 * A deployment created with a `callback` gets a push to Ironic (callback.ts) when its
 * attach ends: `end` once the disk is bootable, `error` once the attach failed for good.
 * The push is fire-and-forget: it never delays or fails a job.
 *
 * Peers (peers.ts, with peers.enabled): attach creates the disk with the image's peer
 * token, lists it with the tracker and hands it the image's other disks; each monitor
 * poll lists it again (with its progress) and sends a new peer list when the list changed
 * or the agent lost it (restarted); once complete it stays listed for peers.seed_time_ms;
 * the teardown withdraws it first. Like profiles, peers never fail or delay a job.
 */
import https from 'node:https';
import { DelayedError, type Job, UnrecoverableError } from 'bullmq';
import { DEFAULT_REGION_SIZE, type ManifestCache, manifestKey } from './manifests.js';
import { type BootProfileStore, type MergedProfile, profileId } from './boot-profiles.js';
import type { Logger } from 'pino';
import { redactUrl } from '../../image-access/src/index.js';
import { AgentClient, type Disk, type Erasure } from '../../openapi/clients/agent-client.js';
import { type CleaningRecord, type CleaningStore, FINISHED } from './cleaning.js';
import { ApiError } from '../../openapi/clients/http.js';
import { type CallbackStatus, notifyIronic } from './callback.js';
import { agentCa, type DriverConfig } from './config.js';
import { loadConfigDrive } from './configdrive.js';
import { nodeDevice } from './device.js';
import { DriverError } from './errors.js';
import { type ResolvedImage, resolveImage } from './image.js';
import type { JobData, Queues } from './queues.js';
import type { ReconcileStore } from './reconcile.js';
import { choosePeers, type PeerHolder, peerId, type PeerTracker, peerListDigest } from './peers.js';
import type { BootProfileRecord, DeploymentRecord, DeploymentStore, PeerRecord, Progress } from './store.js';

export interface JobDeps {
  store: DeploymentStore;
  cleanings: CleaningStore;
  queues: Queues;
  manifests: ManifestCache;
  config: Readonly<DriverConfig>;
  log: Logger;
  /** The service's version, sent as agent_version in pushes to Ironic. */
  version?: string;
  /** Where the agents the service uses are registered for reconcile (reconcile.ts). */
  reconcile?: ReconcileStore;
  /** Boot profiles per image (boot-profiles.ts); absent: none are recorded or replayed. */
  profiles?: BootProfileStore;
  /** Counts what happened to profiles (metrics). */
  onProfile?: (event: 'applied' | 'refused' | 'collected') => void;
  /** The peer tracker (peers.ts); absent or disabled: disks read the origin alone. */
  peers?: PeerTracker;
}

/** Pushes the outcome to Ironic if the deployment asked for it; never waits, never throws. */
function push(deps: JobDeps, rec: DeploymentRecord, status: CallbackStatus, message: string): void {
  if (!rec.spec.callback) return;
  void notifyIronic(rec, status, message, { log: deps.log, version: deps.version ?? '0.0.0' });
}

/** One HTTPS pool per config, shared by every agent client: each poll of an agent need not start a TLS handshake. */
const httpsAgents = new WeakMap<object, https.Agent>();

/** A client of the agent at `url`: the node's token, else the config's (agent.token); agent.timeout_ms and agent.ca. */
export function agentClient(config: Readonly<DriverConfig>, url: string, nodeToken: string | undefined, timeoutMs = config.agent.timeout_ms): AgentClient {
  const token = nodeToken ?? config.agent.token;
  let pool = httpsAgents.get(config);
  if (!pool) {
    const ca = agentCa(config);
    pool = new https.Agent({ keepAlive: true, ...(ca ? { ca } : {}) });
    httpsAgents.set(config, pool);
  }
  return new AgentClient({ baseUrl: url, ...(token ? { token } : {}), timeoutMs, httpsAgent: pool, caSetting: 'agent.ca' });
}

export function agentFor(rec: DeploymentRecord, config: Readonly<DriverConfig>): AgentClient {
  return agentClient(config, rec.agent_url, rec.spec.driver_info.smartnic_agent_token);
}

export function progressOf(disk: Disk): Progress {
  const total = disk.regions.total;
  return {
    regions_total: total,
    regions_local: disk.regions.local,
    bytes_fetched: disk.bytes_fetched,
    fetch_rate_bps: disk.fetch_rate_bps,
    fraction: total > 0 ? disk.regions.local / total : 0,
  };
}

/** Whether an agent failure is worth retrying: transport failures and 5xx yes, a refusal no. */
function agentError(err: unknown, what: string): DriverError {
  if (err instanceof ApiError) {
    if (err.status === null) return new DriverError('DRV_ERR_AGENT_UNREACHABLE', `${what}: ${err.message}`, { cause: err });
    return new DriverError('DRV_ERR_AGENT_REJECTED', `${what}: ${err.code}: ${err.message}`, { cause: err, retryable: err.retryable });
  }
  return new DriverError('DRV_ERR_AGENT_UNREACHABLE', `${what}: ${(err as Error).message}`, { cause: err });
}

/** Records the failure; throws what makes BullMQ retry (transient) or stop (permanent). */
async function fail(deps: JobDeps, job: Job<JobData>, rec: DeploymentRecord, err: unknown): Promise<never> {
  const e = err instanceof DriverError ? err : new DriverError('DRV_ERR_AGENT_UNREACHABLE', (err as Error).message, { cause: err });
  const attempts = job.opts.attempts ?? 1;
  const final = !e.retryable || job.attemptsMade + 1 >= attempts;
  const message = `${e.code}: ${e.message}`;
  const teardown = job.queueName === 'teardown';
  if (final) {
    // A failed teardown leaves the record `failed` with the reason; DELETE again retries it.
    await deps.store.update(rec.node_uuid, rec.deployment_id, { state: 'failed', last_error: message }, { teardown });
    deps.log.warn({ node: rec.node_uuid, job: job.id, code: e.code }, `${job.name} failed for good: ${e.message}`);
    if (job.queueName === 'attach') push(deps, rec, 'error', message);
    throw new UnrecoverableError(message);
  }
  await deps.store.update(rec.node_uuid, rec.deployment_id, { last_error: `${message} (attempt ${job.attemptsMade + 1} of ${attempts}; retrying)` }, { teardown });
  deps.log.info({ node: rec.node_uuid, job: job.id, code: e.code }, `${job.name} will retry: ${e.message}`);
  throw e;
}

/** The record this job belongs to, or null when it was torn down or replaced. */
async function current(deps: JobDeps, job: Job<JobData>): Promise<DeploymentRecord | null> {
  const rec = await deps.store.get(job.data.node);
  return rec && rec.deployment_id === job.data.deployment ? rec : null;
}

/** Whether this deployment's disk must be verified from its first read. */
function requiresVerification(deps: JobDeps, rec: DeploymentRecord): boolean {
  return deps.config.manifests.enabled && (rec.spec.driver_info.smartnic_require_verification ?? deps.config.manifests.require);
}

type ManifestStatus = { kind: 'cached'; manifest: Buffer } | { kind: 'failed'; message: string } | { kind: 'pending' };

/** The manifest `key`: cached, never buildable, or (now) being built for `rec`. */
async function manifestStatus(deps: JobDeps, rec: DeploymentRecord, key: string, regionSize: number): Promise<ManifestStatus> {
  const manifest = await deps.manifests.get(key);
  if (manifest) return { kind: 'cached', manifest };
  const message = await deps.manifests.failure(key);
  if (message) return { kind: 'failed', message };
  await deps.queues.ensureManifestJob(rec, key, regionSize);
  return { kind: 'pending' };
}

const UNVERIFIED = 'streaming unverified until the image manifest is built';

export async function attach(deps: JobDeps, job: Job<JobData>, token?: string): Promise<string> {
  const rec = await current(deps, job);
  if (!rec || rec.state === 'deleting') return 'skipped: the deployment is gone or being deleted';
  if (rec.state !== 'attaching') return `skipped: already ${rec.state}`;
  const agent = agentFor(rec, deps.config);
  const required = requiresVerification(deps, rec);
  const di = rec.spec.driver_info;
  let disk: Disk;
  let image: ResolvedImage;
  let key: string | null = null;
  let status: ManifestStatus | null = null;
  let replay: MergedProfile | null = null;
  let swarm: { key: string; token: string } | { key: null; note: string } | null = null;
  let peers: PeerRecord | null = null;
  // Before any disk is made there, so reconcile looks at this agent even if the record is
  // lost later (reconcile.ts).
  await deps.reconcile?.register(rec.agent_url, di.smartnic_agent_token);
  try {
    image = await resolveImage(rec.spec.instance_info, deps.config);
    if (required) {
      const regionSize = di.smartnic_region_size ?? DEFAULT_REGION_SIZE;
      key = manifestKey(image, rec.spec.instance_info, regionSize);
      if (!key) throw new DriverError('DRV_ERR_INVALID', 'verification is required, but nothing names the image\'s content (no Glance digest, instance_info image_os_hash_value or identity): a manifest cannot be cached for it');
      await deps.store.update(rec.node_uuid, rec.deployment_id, { manifest_key: key });
      status = await manifestStatus(deps, rec, key, regionSize);
      if (status.kind === 'failed') {
        const code = status.message.startsWith('DRV_ERR_INVALID') ? 'DRV_ERR_INVALID' : 'DRV_ERR_IMAGE_MISMATCH';
        throw new DriverError(code, `verification is required: ${status.message.replace(/^DRV_ERR_[A-Z_]+: /, '')}`);
      }
      if (status.kind === 'pending') {
        await deps.store.update(rec.node_uuid, rec.deployment_id, { last_error: 'waiting for the image manifest: verification is required, so the disk is created once it is built' });
        await job.moveToDelayed(Date.now() + deps.config.jobs.monitor_interval_ms, token);
        throw new DelayedError();
      }
    }
    const profiles = deps.profiles && deps.config.boot_profiles.enabled ? deps.profiles : null;
    const profileRegionSize = di.smartnic_region_size ?? DEFAULT_REGION_SIZE;
    replay = profiles ? await lookupProfile(deps, profiles, rec, image, profileRegionSize) : null;
    swarm = await peerToken(deps, rec, image, profileRegionSize);
    if (swarm?.key && !status) {
      // Its manifest, if cached, goes with the disk: peers are asked only once it can verify them.
      const cached = await deps.manifests.get(swarm.key);
      if (cached) {
        status = { kind: 'cached', manifest: cached };
        key = swarm.key;
      }
    }
    disk = await agent
      .createDisk({
        id: rec.disk_id,
        source: {
          url: image.url,
          ...(image.headers && Object.keys(image.headers).length ? { headers: image.headers } : {}),
          ...(image.identity ? { identity: image.identity } : {}),
          ...(image.format !== 'raw' ? { format: image.format } : {}),
        },
        target: { path: di.smartnic_target },
        device: nodeDevice(rec.spec),
        // Ironic's root_gb is GiB; 0 or absent: the agent's default (the whole target device, else the image).
        ...(rec.spec.instance_info.root_gb ? { size: rec.spec.instance_info.root_gb * 2 ** 30 } : {}),
        // A profile's regions are of its region size: the disk is asked for that one.
        ...(di.smartnic_region_size || required || replay || swarm?.key ? { region_size: profileRegionSize } : {}),
        ...(swarm?.key ? { peers: { token: swarm.token } } : {}),
        // With peers and the manifest at hand, the copy waits for both (sent right below), so
        // that its first regions come from peers rather than the origin.
        hydration: { bandwidth: di.smartnic_bandwidth ?? 0, ...(swarm?.key && status?.kind === 'cached' ? { await_manifest_ms: MANIFEST_WAIT_MS } : {}) },
        boot_profile: profiles ? { record: true, ...(replay ? { replay: { region_size: profileRegionSize, regions: replay.merged, boots: replay.boots } } : {}) } : { record: false },
      })
      .catch((err: unknown) => {
        throw agentError(err, `creating disk ${rec.disk_id} on ${rec.agent_url}`);
      });
    // The peer list before the manifest: the manifest's arrival starts the copy.
    if (swarm?.key) peers = await joinPeers(deps, rec, disk, { ...NO_PEERS, key: swarm.key });
    if (status?.kind === 'cached' && !disk.manifest && disk.state !== 'complete') disk = await uploadManifest(rec, deps, status.manifest);
    // Before the disk is ready, so before Ironic powers the host on.
    const configdrive = rec.spec.instance_info.configdrive;
    if (configdrive) disk = await writeConfigDrive(rec, deps, configdrive);
  } catch (err) {
    if (err instanceof DelayedError) throw err;
    return fail(deps, job, rec, err);
  }
  // A teardown may have started while the agent was creating the disk: it may have found
  // nothing to delete, so this job cleans up what it made instead of leaving an orphan.
  const now = await current(deps, job);
  if (!now || now.state === 'deleting') {
    // If this wipe fails the agent keeps the disk (`wiping`, its target refused to new disks) and retries it at its next start.
    await agent.deleteDisk(rec.disk_id, true).catch((err: unknown) => deps.log.warn({ node: rec.node_uuid, disk: rec.disk_id, err: (err as Error).message }, 'deleting the disk of a deployment torn down while attaching failed'));
    return 'cancelled: torn down while attaching';
  }
  // Not required: upload a cached manifest, or have it built and stream unverified meanwhile.
  let note: string | null = null;
  if (!required && deps.config.manifests.enabled && !disk.manifest && disk.state !== 'complete') {
    key = manifestKey(image, rec.spec.instance_info, disk.region_size);
    if (key) {
      try {
        status = await manifestStatus(deps, rec, key, disk.region_size);
        if (status.kind === 'cached') disk = await uploadManifest(rec, deps, status.manifest);
        else note = status.kind === 'failed' ? status.message : UNVERIFIED;
      } catch (err) {
        note = `${UNVERIFIED}: ${(err as Error).message}`;
      }
    }
  }
  const profileKey = deps.profiles && deps.config.boot_profiles.enabled ? manifestKey(image, rec.spec.instance_info, disk.region_size) : null;
  const bootProfile = profileKey ? await profileOutcome(deps, rec, disk, profileKey, replay) : null;
  if (swarm && swarm.key === null) peers = { ...NO_PEERS, note: swarm.note };
  const updated = await deps.store.update(rec.node_uuid, rec.deployment_id, {
    state: disk.state === 'complete' ? 'complete' : 'ready',
    profile_key: profileKey,
    boot_profile: bootProfile,
    peers,
    image_url: redactUrl(image.url),
    image_expires_at: expiryOf(image),
    export_uri: disk.export.uri,
    progress: progressOf(disk),
    manifest_key: key,
    last_error: note,
  });
  if (updated) push(deps, rec, 'end', `streaming disk ${disk.state === 'complete' ? 'complete' : 'ready'}: ${disk.export.uri}`);
  await job.updateProgress(100);
  if (disk.state !== 'complete' || bootProfile?.recording === 'recording') await deps.queues.enqueue('monitor', rec);
  deps.log.info({ node: rec.node_uuid, disk: rec.disk_id, export: disk.export.uri, image: redactUrl(image.url), via: image.via, verified: disk.verified, profile: bootProfile?.applied ?? 0 }, 'streaming disk ready');
  return `ready: ${disk.export.uri}${disk.verified ? ' (verified)' : ''}`;
}

/** The image's merged profile to replay, or null (none, or Redis failed: a profile never fails a deployment). */
async function lookupProfile(deps: JobDeps, profiles: BootProfileStore, rec: DeploymentRecord, image: ResolvedImage, regionSize: number): Promise<MergedProfile | null> {
  const key = manifestKey(image, rec.spec.instance_info, regionSize);
  if (!key) return null;
  try {
    const p = await profiles.forKey(key);
    return p && p.merged.length > 0 && p.region_size === regionSize ? p : null;
  } catch (err) {
    deps.log.warn({ node: rec.node_uuid, err: (err as Error).message }, 'reading the image\'s boot profile failed; deploying without one');
    return null;
  }
}

/** How long a disk created with its manifest at hand holds its copy for it (the upload follows at once). */
const MANIFEST_WAIT_MS = 30_000;

/** The note of a disk that another disk of its image reported (PeerTracker.ban). */
const BANNED = 'not offered to peers: a disk of the image reported bytes from it that failed verification (a damaged target?); it is not listed for the seeding time';

const NO_PEERS: PeerRecord = { key: null, sources: 0, bytes_from_peers: 0, bytes_served: 0, listed_until: null, digest: null, note: null };

/**
 * The image's peer group and token, when peers are on: null when they are off; a note
 * instead of a key when this image cannot take part (nothing names its content, or Redis
 * failed: the disk reads the origin alone).
 */
async function peerToken(deps: JobDeps, rec: DeploymentRecord, image: ResolvedImage, regionSize: number): Promise<{ key: string; token: string } | { key: null; note: string } | null> {
  const tracker = deps.peers;
  if (!tracker?.enabled || !deps.config.manifests.enabled) return null;
  const key = manifestKey(image, rec.spec.instance_info, regionSize);
  if (!key) return { key: null, note: 'no peers: nothing names the image\'s content (no Glance digest, image_os_hash_value or identity), so what peers send could not be verified' };
  try {
    return { key, token: await tracker.token(key) };
  } catch (err) {
    deps.log.warn({ node: rec.node_uuid, err: (err as Error).message }, 'no peer token for the image; the disk reads the origin alone');
    return { key: null, note: `no peers: the peer token could not be made: ${(err as Error).message}` };
  }
}

/**
 * Lists the disk with the tracker and, while it still copies, hands it the image's other
 * disks when its list changed or the agent lost it. Returns the record's `peers`; a
 * failure is a note there (tried again at the next poll), never a failed job.
 */
async function joinPeers(deps: JobDeps, rec: DeploymentRecord, disk: Disk, prev: PeerRecord): Promise<PeerRecord> {
  const tracker = deps.peers!;
  const key = prev.key!;
  const di = rec.spec.driver_info;
  const self = { deployment: `${rec.node_uuid}/${rec.deployment_id}`, url: di.smartnic_peer_url ?? rec.agent_url, agent: rec.agent_url, disk: rec.disk_id, rack: di.smartnic_rack ?? null };
  const complete = disk.state === 'complete';
  // What it can serve: regions are served once verified, so none before its manifest; a
  // complete disk is a seed once its whole target has been checked.
  const seed = complete && disk.verified;
  const stats = { sources: disk.peers.sources, bytes_from_peers: disk.peers.bytes_from_peers, bytes_served: disk.peers.bytes_served };
  try {
    // A seed is listed once, when it becomes one, for the seeding time: later polls (a
    // boot still recording) must not stretch it.
    let listedUntil = prev.listed_until;
    if (complete && !seed) {
      // Complete but never verified (it completed before the manifest came): it serves
      // nothing, and copies nothing more.
      await tracker.withdraw(key, self.deployment);
      return { ...prev, ...stats, listed_until: null, seeder: false, digest: 'complete', note: 'not offered to peers: the disk completed before the image manifest reached it, so its regions are not verified' };
    }
    // Not listed when a disk of the image reported bytes from it that failed verification
    // there; it still copies from the others.
    let banned = false;
    if (!seed || prev.digest !== 'complete') {
      const entry = await tracker.announce(key, { ...self, local: disk.manifest ? disk.regions.local : 0, total: disk.regions.total, complete: seed });
      banned = entry === null;
      listedUntil = entry ? new Date(entry.until).toISOString() : null;
      if (seed) await tracker.freeSlot(key, self.deployment);
    }
    const note = banned ? BANNED : null;
    if (seed) return { ...prev, ...stats, listed_until: listedUntil, seeder: false, digest: 'complete', note };
    // Peers this disk dropped because their bytes failed verification: out of every list.
    // (An agent older than excluded_sources names none.)
    let listed = await tracker.holders(key);
    for (const src of disk.peers.excluded_sources ?? []) {
      const same = (h: PeerHolder): boolean => h.deployment !== self.deployment && peerId(h) === peerId(src);
      for (const liar of listed.filter(same)) {
        if (await tracker.ban(key, liar.deployment)) {
          deps.log.warn({ node: rec.node_uuid, disk: rec.disk_id, peer: liar.deployment, url: liar.url }, `a peer sent bytes that failed verification at disk ${rec.disk_id}: it is no longer listed for any disk of the image`);
        }
      }
      listed = listed.filter((h) => !same(h));
    }
    const { live: holders } = await tracker.liveHolders(key, listed, self.deployment, async (h) => {
      const answered = await agentAnswers(deps, h);
      if (!answered) deps.log.warn({ node: rec.node_uuid, seed: h.deployment, agent: h.agent }, "a seed's DPU agent does not answer: it is left out of the peer lists (and another disk of the image may seed) until it answers again");
      return answered;
    });
    // A banned disk seeds nothing: it does not take a seeder slot (ban freed any it held).
    const seeder = banned ? false : await tracker.seeder(key, self.deployment, holders.some((h) => h.complete && h.deployment !== self.deployment));
    const list = choosePeers(holders, self, deps.config.peers.max_peers);
    const originWait = seeder ? 0 : deps.config.peers.origin_wait_ms;
    const digest = `${peerListDigest(list)}/${originWait}`;
    if (digest !== prev.digest || disk.peers.sources !== list.length) {
      const updated = await agentFor(rec, deps.config)
        .setPeers(rec.disk_id, { sources: list, origin_wait_ms: originWait })
        .catch((err: unknown) => {
          throw agentError(err, `sending the peer list to disk ${rec.disk_id} on ${rec.agent_url}`);
        });
      stats.sources = updated.peers.sources;
      deps.log.debug({ node: rec.node_uuid, disk: rec.disk_id, peers: list.length }, 'peer list sent');
    }
    return { ...prev, ...stats, listed_until: listedUntil, digest, seeder, note };
  } catch (err) {
    deps.log.warn({ node: rec.node_uuid, disk: rec.disk_id, err: (err as Error).message }, 'peers: tracker or agent failed; retrying at the next poll');
    return { ...prev, ...stats, digest: null, note: `peers: ${(err as Error).message}; retrying` };
  }
}

/** How long a probe of a seed's agent waits: a node that died may not even refuse the connection. */
const SEED_PROBE_TIMEOUT_MS = 2_000;

/** Whether a seed's agent answers (GET /v1/health): any HTTP answer counts; no answer (refused, reset, timed out) does not. */
async function agentAnswers(deps: JobDeps, h: PeerHolder): Promise<boolean> {
  try {
    await agentClient(deps.config, h.agent ?? h.url, undefined, SEED_PROBE_TIMEOUT_MS).health();
    return true;
  } catch (err) {
    return err instanceof ApiError && err.status !== null;
  }
}

/** What the agent did with the profile sent (or with recording), for the record; a refused profile is deleted. */
async function profileOutcome(deps: JobDeps, rec: DeploymentRecord, disk: Disk, key: string, replay: MergedProfile | null): Promise<BootProfileRecord> {
  const id = profileId(key);
  const r = disk.boot_profile.replay;
  let note: string | null = null;
  if (replay && r.state === 'refused') {
    note = `boot profile not replayed: ${r.error ?? 'refused by the agent'}; the stored profile is deleted`;
    deps.onProfile?.('refused');
    await deps.profiles!.delete(id).catch(() => undefined);
    deps.log.warn({ node: rec.node_uuid, profile: id }, note);
  } else if (replay && r.state === 'disabled') {
    note = 'boot profile not replayed: boot profiles are disabled on the DPU agent';
  } else if (replay && r.state === 'applied') {
    deps.onProfile?.('applied');
  }
  return { id, applied: r.state === 'applied' ? r.regions : 0, boots: r.state === 'applied' ? (r.boots ?? replay?.boots ?? 0) : 0, recording: disk.boot_profile.recording.state, collected: false, note };
}

function recordingPending(state: string): boolean {
  return state === 'waiting' || state === 'recording';
}

/**
 * One look at the recording (a monitor poll, or the teardown): stores it once `done`;
 * returns the record's new boot_profile (or null when nothing changed) and whether a
 * complete disk is worth polling for it (the host is booting: `recording`).
 */
async function collectProfile(deps: JobDeps, rec: DeploymentRecord, disk: Disk): Promise<{ update: BootProfileRecord | null; pending: boolean }> {
  const bp = rec.boot_profile;
  if (!bp || bp.collected || !rec.profile_key || !deps.profiles || !deps.config.boot_profiles.enabled) return { update: null, pending: false };
  const state = disk.boot_profile.recording.state;
  if (recordingPending(state)) {
    const late = Date.now() - Date.parse(rec.created_at) > deps.config.boot_profiles.collect_timeout_ms;
    if (!late) return { update: state !== bp.recording ? { ...bp, recording: state } : null, pending: state === 'recording' };
    return { update: { ...bp, recording: state, note: `boot not collected: the recording was still ${state} boot_profiles.collect_timeout_ms after the deployment was created` }, pending: false };
  }
  if (state !== 'done') return { update: state !== bp.recording ? { ...bp, recording: state, note: state === 'interrupted' ? 'boot not collected: the DPU agent restarted while recording' : bp.note } : null, pending: false };
  try {
    const p = await agentFor(rec, deps.config).bootProfile(rec.disk_id);
    if (p.region_size !== disk.region_size) throw new Error(`the recording is of ${p.region_size}-byte regions, the disk's are ${disk.region_size}`);
    if (p.regions.length > 0) {
      await deps.profiles.push({ boot: `${rec.node_uuid}/${rec.deployment_id}/${rec.created_at}`, node: rec.node_uuid, key: rec.profile_key, region_size: p.region_size, recorded_at: p.ended_at ?? new Date().toISOString(), regions: [...p.regions] });
      deps.onProfile?.('collected');
    }
    deps.log.info({ node: rec.node_uuid, profile: bp.id, regions: p.regions.length, stop: p.stop_reason }, 'boot profile collected');
    return { update: { ...bp, recording: 'done', collected: true, note: p.regions.length > 0 ? bp.note : 'the host read no image region while recording' }, pending: false };
  } catch (err) {
    // Tried again at the next poll.
    return { update: { ...bp, recording: state, note: `collecting the boot profile: ${(err as Error).message}; retrying` }, pending: true };
  }
}

/** Downloads or decodes the config drive and has the agent write it onto the disk (a no-op when it already holds it). */
async function writeConfigDrive(rec: DeploymentRecord, deps: JobDeps, value: string): Promise<Disk> {
  const drive = await loadConfigDrive(value, deps.config.glance.timeout_ms);
  const disk = await agentFor(rec, deps.config)
    .setConfigDrive(rec.disk_id, drive)
    .catch((err: unknown) => {
      throw agentError(err, `writing the config drive onto disk ${rec.disk_id} on ${rec.agent_url}`);
    });
  const cd = disk.config_drive;
  deps.log.info({ node: rec.node_uuid, disk: rec.disk_id, partition: cd?.partition, offset: cd?.offset, bytes: cd?.bytes }, 'config drive written');
  return disk;
}

async function uploadManifest(rec: DeploymentRecord, deps: JobDeps, manifest: Buffer): Promise<Disk> {
  const disk = await agentFor(rec, deps.config)
    .setManifest(rec.disk_id, manifest)
    .catch((err: unknown) => {
      throw agentError(err, `uploading the image manifest to disk ${rec.disk_id} on ${rec.agent_url}`);
    });
  deps.log.info({ node: rec.node_uuid, disk: rec.disk_id }, 'image manifest uploaded: fetched regions are verified');
  return disk;
}

export async function monitor(deps: JobDeps, job: Job<JobData>, token: string | undefined): Promise<string> {
  const rec = await current(deps, job);
  if (!rec || rec.state === 'deleting' || rec.state === 'failed') return 'stopped: the deployment is gone, failed or being deleted';
  let disk: Disk | null = null;
  try {
    disk = await agentFor(rec, deps.config).getDisk(rec.disk_id);
  } catch (err) {
    if (err instanceof ApiError && err.status === 404) {
      await deps.store.update(rec.node_uuid, rec.deployment_id, { state: 'failed', last_error: `DRV_ERR_AGENT_REJECTED: the DPU agent at ${rec.agent_url} no longer has disk ${rec.disk_id}` });
      return 'stopped: the disk is gone from the agent';
    }
    // Unreachable agent: keep polling (the host runs from the DPU either way), say so.
    await deps.store.update(rec.node_uuid, rec.deployment_id, { last_error: `${agentError(err, 'polling progress').message}; still polling` });
  }
  if (disk?.state === 'wiping') {
    // Deleted on the agent behind the driver's back (a DELETE of this deployment sets `deleting` first, which stops this job).
    await deps.store.update(rec.node_uuid, rec.deployment_id, { state: 'failed', last_error: `DRV_ERR_AGENT_REJECTED: disk ${rec.disk_id} was deleted on the DPU agent at ${rec.agent_url} and waits for its wipe${disk.last_error ? ` (${disk.last_error})` : ''}` });
    return 'stopped: the disk was deleted on the agent';
  }
  if (disk) {
    let note: string | null = null;
    // Not to a complete disk: it has no source left to fetch again a region that fails the
    // check. So a disk that completed before its image's manifest was built is never
    // verified, and never serves peers (deploy an image once, or require verification,
    // before a fleet: docs/fleet.md).
    if (rec.manifest_key && !disk.manifest && disk.state !== 'complete' && deps.config.manifests.enabled) {
      try {
        const status = await manifestStatus(deps, rec, rec.manifest_key, disk.region_size);
        if (status.kind === 'cached') disk = await uploadManifest(rec, deps, status.manifest);
        else note = status.kind === 'failed' ? status.message : UNVERIFIED;
      } catch (err) {
        note = `${UNVERIFIED}: ${(err as Error).message}`;
      }
    } else if (rec.manifest_key && !disk.verified) {
      note = await deps.manifests.failure(rec.manifest_key).catch(() => null);
    }
    const progress = progressOf(disk);
    const complete = disk.state === 'complete';
    const profile = await collectProfile(deps, rec, disk);
    const peers = rec.peers?.key && deps.peers?.enabled ? await joinPeers(deps, rec, disk, rec.peers) : null;
    await deps.store.update(rec.node_uuid, rec.deployment_id, {
      progress,
      last_error: [disk.last_error, note].filter((x) => x).join('; ') || null,
      ...(complete ? { state: 'complete' as const } : {}),
      ...(profile.update ? { boot_profile: profile.update } : {}),
      ...(peers ? { peers } : {}),
    });
    await job.updateProgress(Math.floor(progress.fraction * 100));
    if (complete && rec.state !== 'complete') deps.log.info({ node: rec.node_uuid, disk: rec.disk_id, bytes: progress.bytes_fetched }, 'hydration complete');
    if (complete && !profile.pending) return 'complete';
    // Complete but the host's boot is still being recorded: keep polling for it, without a source to renew.
    if (!complete && (await renewSource(deps, rec))) return 'stopped: the image source cannot be renewed';
  }
  await job.moveToDelayed(Date.now() + deps.config.jobs.monitor_interval_ms, token);
  throw new DelayedError();
}

function expiryOf(image: ResolvedImage): string | null {
  return image.expires !== undefined ? new Date(image.expires * 1000).toISOString() : null;
}

/**
 * Renews an expiring image URL (a Swift temp URL) once a third or less of its lifetime
 * is left, by resolving the image again, and hands the new URL to the agent, which checks
 * it names the same image. Glance or Swift away: noted in last_error and tried again at
 * the next poll, while the old URL still works. A permanent failure (the image is gone,
 * the agent refuses the identity) fails the deployment; true then.
 */
async function renewSource(deps: JobDeps, rec: DeploymentRecord): Promise<boolean> {
  if (!rec.image_expires_at) return false;
  const left = Date.parse(rec.image_expires_at) - Date.now();
  if (left > (deps.config.glance.swift_temp_url_duration * 1000) / 3) return false;
  try {
    const image = await resolveImage(rec.spec.instance_info, deps.config);
    await agentFor(rec, deps.config)
      .updateSource(rec.disk_id, {
        url: image.url,
        ...(image.headers && Object.keys(image.headers).length ? { headers: image.headers } : {}),
        ...(image.identity ? { identity: image.identity } : {}),
      })
      .catch((err: unknown) => {
        throw agentError(err, `renewing the source URL of disk ${rec.disk_id} on ${rec.agent_url}`);
      });
    await deps.store.update(rec.node_uuid, rec.deployment_id, { image_url: redactUrl(image.url), image_expires_at: expiryOf(image) });
    deps.log.info({ node: rec.node_uuid, disk: rec.disk_id, image: redactUrl(image.url), left_ms: left }, 'image URL renewed');
    return false;
  } catch (err) {
    const e = err instanceof DriverError ? err : new DriverError('DRV_ERR_INTERNAL', (err as Error).message, { cause: err });
    const message = `${e.code}: renewing the image URL (expires ${rec.image_expires_at}): ${e.message}`;
    if (e.retryable) {
      await deps.store.update(rec.node_uuid, rec.deployment_id, { last_error: `${message}; retrying` });
      deps.log.warn({ node: rec.node_uuid, code: e.code }, message);
      return false;
    }
    await deps.store.update(rec.node_uuid, rec.deployment_id, { state: 'failed', last_error: message });
    deps.log.warn({ node: rec.node_uuid, code: e.code }, message);
    return true;
  }
}

export async function teardown(deps: JobDeps, job: Job<JobData>): Promise<string> {
  const rec = await current(deps, job);
  if (!rec) return 'nothing to do: the deployment is gone';
  // An attach that has not started yet must not start now.
  const pending = await deps.queues.job('attach', rec);
  if (pending && ['waiting', 'delayed', 'prioritized'].includes(await pending.getState())) await pending.remove().catch(() => undefined);
  await collectBeforeTeardown(deps, rec);
  // Out of the peer lists before the disk goes (peers asking meanwhile fall back to the origin).
  if (rec.peers?.key && deps.peers) {
    await deps.peers.withdraw(rec.peers.key, `${rec.node_uuid}/${rec.deployment_id}`).catch((err: unknown) => deps.log.warn({ node: rec.node_uuid, err: (err as Error).message }, 'withdrawing the disk from the peer tracker failed; its entry expires by itself'));
  }
  try {
    await agentFor(rec, deps.config)
      .deleteDisk(rec.disk_id, job.data.wipe ?? true)
      .catch((err: unknown) => {
        // Never created, or deleted and (if a wipe was asked for) wiped: the agent keeps a disk until its wipe succeeded.
        if (err instanceof ApiError && err.status === 404) return null;
        // DPU_ERR_WIPE_FAILED is retryable: retried with backoff, then the deployment is left failed with it.
        throw agentError(err, `deleting disk ${rec.disk_id} on ${rec.agent_url}`);
      });
  } catch (err) {
    return fail(deps, job, rec, err);
  }
  await deps.store.remove(rec.node_uuid, rec.deployment_id);
  deps.log.info({ node: rec.node_uuid, disk: rec.disk_id, wipe: job.data.wipe ?? true }, 'torn down');
  return 'deleted';
}

/** A boot recorded after the monitor job ended (hydration beat the power-on): stored before the disk goes. Never fails the teardown. */
async function collectBeforeTeardown(deps: JobDeps, rec: DeploymentRecord): Promise<void> {
  const bp = rec.boot_profile;
  if (!bp || bp.collected || !rec.profile_key || !deps.profiles || !deps.config.boot_profiles.enabled) return;
  try {
    const disk = await agentFor(rec, deps.config).getDisk(rec.disk_id);
    if (disk.boot_profile.recording.state !== 'done') return;
    const { update } = await collectProfile(deps, rec, disk);
    if (update) await deps.store.update(rec.node_uuid, rec.deployment_id, { boot_profile: update }, { teardown: true });
  } catch (err) {
    deps.log.debug({ node: rec.node_uuid, err: (err as Error).message }, 'no boot profile collected at teardown');
  }
}

/** How often a clean job starts an erasure again after the agent restarted during one. */
export const MAX_CLEAN_RESTARTS = 3;

export function agentForCleaning(rec: CleaningRecord, config: Readonly<DriverConfig>): AgentClient {
  return agentClient(config, rec.agent_url, rec.driver_info.smartnic_agent_token);
}

/** Records a clean job's failure; throws what makes BullMQ retry (transient) or stop (permanent). */
async function failCleaning(deps: JobDeps, job: Job<JobData>, rec: CleaningRecord, err: unknown): Promise<never> {
  const e = err instanceof DriverError ? err : new DriverError('DRV_ERR_INTERNAL', (err as Error).message, { cause: err });
  const attempts = job.opts.attempts ?? 1;
  const final = !e.retryable || job.attemptsMade + 1 >= attempts;
  const message = `${e.code}: ${e.message}`;
  if (final) {
    await deps.cleanings.update(rec.node_uuid, rec.cleaning_id, { state: 'failed', last_error: message, finished_at: new Date().toISOString() });
    deps.log.warn({ node: rec.node_uuid, job: job.id, code: e.code }, `clean failed for good: ${e.message}`);
    throw new UnrecoverableError(message);
  }
  await deps.cleanings.update(rec.node_uuid, rec.cleaning_id, { last_error: `${message} (attempt ${job.attemptsMade + 1} of ${attempts}; retrying)` });
  deps.log.info({ node: rec.node_uuid, job: job.id, code: e.code }, `clean will retry: ${e.message}`);
  throw e;
}

export async function clean(deps: JobDeps, job: Job<JobData>, token: string | undefined): Promise<string> {
  const rec = await deps.cleanings.get(job.data.node);
  if (!rec || rec.cleaning_id !== job.data.cleaning) return 'skipped: the cleaning was replaced';
  if (FINISHED.includes(rec.state)) return `stopped: the cleaning is ${rec.state}`;
  const agent = agentForCleaning(rec, deps.config);
  const at = `${rec.target} on ${rec.agent_url}`;
  let erasure: Erasure | null = null;
  let restarts = rec.restarts;
  try {
    if (rec.erasure_id) {
      erasure = await agent.getErasure(rec.erasure_id).catch((err: unknown) => {
        if (err instanceof ApiError && err.status === 404) return null;
        throw agentError(err, `polling erasure ${rec.erasure_id} of ${at}`);
      });
      const lost = erasure === null ? 'the agent no longer knows it' : erasure.state === 'failed' && erasure.error_code === 'DPU_ERR_ERASE_INTERRUPTED' ? erasure.last_error : null;
      if (lost !== null) {
        if (restarts >= MAX_CLEAN_RESTARTS) throw new DriverError('DRV_ERR_AGENT_REJECTED', `erasure ${rec.erasure_id} of ${at} did not finish (${lost}), ${restarts + 1} times; the target is only partly erased`);
        restarts += 1;
        deps.log.warn({ node: rec.node_uuid, erasure: rec.erasure_id, why: lost }, 'the erasure did not finish; erasing again from the start');
        erasure = null;
      }
    }
    if (!erasure) {
      erasure = await agent.createErasure({ target: { path: rec.target }, mode: rec.mode }).catch((err: unknown) => {
        throw agentError(err, `erasing ${at} (${rec.mode})`);
      });
      const recorded = await deps.cleanings.update(rec.node_uuid, rec.cleaning_id, {
        state: 'running',
        erasure_id: erasure.id,
        restarts,
        started_at: rec.started_at ?? erasure.started_at,
        last_error: restarts > rec.restarts ? `the agent's erasure was interrupted; erasing again (${restarts} of at most ${MAX_CLEAN_RESTARTS})` : null,
      });
      if (!recorded) {
        // Cancelled (or replaced) while the agent was starting it: stop what this job started.
        await agent.cancelErasure(erasure.id).catch((err: unknown) => deps.log.warn({ node: rec.node_uuid, erasure: erasure!.id, err: (err as Error).message }, 'cancelling the erasure of a cancelled cleaning failed'));
        return 'cancelled while starting';
      }
      deps.log.info({ node: rec.node_uuid, erasure: erasure.id, target: rec.target, mode: rec.mode }, 'erasure started');
    }
  } catch (err) {
    return failCleaning(deps, job, rec, err);
  }
  const progress = {
    method: erasure.method,
    bytes_done: erasure.bytes_done,
    bytes_total: erasure.bytes_total,
    fraction: erasure.bytes_total > 0 ? erasure.bytes_done / erasure.bytes_total : erasure.state === 'done' ? 1 : 0,
  };
  if (erasure.state === 'done') {
    await deps.cleanings.update(rec.node_uuid, rec.cleaning_id, { ...progress, fraction: 1, state: 'done', last_error: null, finished_at: erasure.finished_at ?? new Date().toISOString() });
    await job.updateProgress(100);
    deps.log.info({ node: rec.node_uuid, erasure: erasure.id, mode: rec.mode, method: erasure.method, bytes: erasure.bytes_total }, 'cleaning done');
    return `done: ${erasure.bytes_total} bytes of ${rec.target} erased (${rec.mode}, ${erasure.method})`;
  }
  if (erasure.state === 'failed') {
    const message = `DRV_ERR_AGENT_REJECTED: erasing ${at} (${rec.mode}) failed: ${erasure.error_code ?? 'DPU_ERR_ERASE_FAILED'}: ${erasure.last_error ?? 'no reason given'}`;
    await deps.cleanings.update(rec.node_uuid, rec.cleaning_id, { ...progress, state: 'failed', last_error: message, finished_at: erasure.finished_at ?? new Date().toISOString() });
    deps.log.warn({ node: rec.node_uuid, erasure: erasure.id, code: erasure.error_code }, message);
    throw new UnrecoverableError(message);
  }
  await deps.cleanings.update(rec.node_uuid, rec.cleaning_id, { ...progress, state: 'running' });
  await job.updateProgress(Math.floor(progress.fraction * 100));
  await job.moveToDelayed(Date.now() + deps.config.jobs.monitor_interval_ms, token);
  throw new DelayedError();
}

/**
 * Prometheus metrics of the daemon: per-disk gauges labelled `disk`, read from the disk
 * manager at scrape time (nothing to keep in sync), plus the process's default metrics.
 * Each app gets its own registry, never prom-client's global one, so several agents can
 * live in one process (tests). Rates are for Prometheus to compute from bytes_fetched.
 */
import { collectDefaultMetrics, Counter, Gauge, Registry } from 'prom-client';
import type { DiskManager, DiskMetrics } from './disks.js';

export interface AgentMetrics {
  registry: Registry;
  contentType: string;
  render(): Promise<string>;
}

const PREFIX = 'dpu_agent_';

export function createMetrics(manager: Pick<DiskManager, 'metrics' | 'hostActivity'>): AgentMetrics {
  const registry = new Registry();
  collectDefaultMetrics({ register: registry, prefix: PREFIX });
  const perDisk: [name: string, help: string, value: (d: DiskMetrics) => number][] = [
    ['regions_total', 'Regions of the disk.', (d) => d.regionsTotal],
    ['regions_local', 'Regions on the local target.', (d) => d.regionsLocal],
    ['bytes_fetched', 'Bytes fetched from the origin since the disk was opened (counts from 0 after a restart).', (d) => d.bytesFetched],
    ['fetch_retries', 'Range-request attempts retried since the disk was opened.', (d) => d.fetchRetries],
    ['block_misses', 'Host reads answered by fetching only the blocks they needed (not whole regions) since the disk was opened.', (d) => d.blockMisses],
    ['block_bytes_fetched', 'Bytes those block fetches brought (part of bytes_fetched).', (d) => d.blockBytesFetched],
    ['hydration_running', '1 while background hydration runs.', (d) => (d.hydrationRunning ? 1 : 0)],
    ['complete', '1 once every region is local and the source is closed.', (d) => (d.complete ? 1 : 0)],
    ['failed', '1 while the disk cannot be opened or its local target failed (see last_error in the API).', (d) => (d.failed ? 1 : 0)],
    ['regions_failed', 'Regions that failed verification five times and are not fetched again.', (d) => d.failedRegions],
    ['boot_profile_recording', '1 while the host\'s boot reads are being recorded (boot_profile.recording.state recording).', (d) => (d.profileRecording ? 1 : 0)],
    ['boot_profile_recorded_regions', 'Regions recorded in the disk\'s boot profile so far.', (d) => d.profileRecordedRegions],
    ['boot_profile_replay_regions', 'Regions of the boot profile replayed on the disk (0: none applied).', (d) => d.profileReplayRegions],
    ['boot_profile_replay_local_regions', 'Regions of the replayed boot profile that are local (or zero) already.', (d) => d.profileReplayLocal],
    ['wipe_pending', '1 while the disk is deleted but its target is not wiped yet (state wiping; a DELETE retries the wipe).', (d) => (d.wipePending ? 1 : 0)],
  ];
  // One snapshot per scrape, shared by every gauge's collect().
  let snapshot: { at: number; disks: DiskMetrics[] } | null = null;
  const disks = (): DiskMetrics[] => {
    const now = Date.now();
    if (!snapshot || now - snapshot.at > 100) snapshot = { at: now, disks: manager.metrics() };
    return snapshot.disks;
  };
  for (const [name, help, value] of perDisk) {
    new Gauge({
      name: PREFIX + name,
      help,
      labelNames: ['disk'],
      registers: [registry],
      collect() {
        this.reset();
        for (const d of disks()) this.set({ disk: d.id }, value(d));
      },
    });
  }
  new Gauge({
    name: `${PREFIX}disks`,
    help: 'Disks the agent manages.',
    registers: [registry],
    collect() {
      this.set(disks().length);
    },
  });
  // Counters kept by the disk manager, read at scrape time (a Counter cannot be set).
  const host = manager.hostActivity;
  for (const [name, help, value] of [
    ['peer_serve_holds_total', "Peer reads and answer pieces that waited for a pause in the host's NBD requests (peers.host_yield_ms).", () => host.holds],
    ['peer_serve_held_seconds_total', 'Seconds they waited in all.', () => host.heldMs / 1000],
  ] as const) {
    new Counter({
      name: PREFIX + name,
      help,
      registers: [registry],
      collect() {
        this.reset();
        this.inc(value());
      },
    });
  }
  return { registry, contentType: registry.contentType, render: () => registry.metrics() };
}

/**
 * A fleet deploying one image (issue #15, docs/fleet.md), on loopback: N agent daemons,
 * one driver service with the tracker on or off, one origin whose send rate is capped (the
 * shared origin link), each node's background copy capped (its link: driver_info
 * smartnic_bandwidth, which bounds what the disk takes in, from the origin or peers). All
 * N disks are created at once through the driver; the bench waits until every one is
 * complete (every region local) and counts the origin's bytes.
 *
 * Reported per fleet size, with peers off and on, medians of `--reps` interleaved rounds:
 *   origin ÷ image   the origin's bytes for the fleet over the image's data bytes (what one
 *                    disk copies: the zero regions are never fetched)
 *   all local        seconds from the first create to the last disk complete, and that
 *                    over a single node's (the N=1 run with peers off)
 *
 * What this is not: the agents share loopback and 2 cores, and a node's *upload* (what it
 * serves to peers) is not capped — only its intake is. docs/fleet.md says how the figures
 * carry over. The image's manifest is cached before each run (an image deployed before):
 * a fresh image's manifest build reads it once more from the origin.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { AgentClient } from '../openapi/clients/agent-client.js';
import { DriverClient } from '../openapi/clients/driver-client.js';
import { makeImage } from '../tests/helpers/agent.js';
import { NetLab } from '../tests/helpers/netns.js';
import { fleetPlots } from './fleet-plots.js';
import { TestOrigin } from '../tests/helpers/origin.js';
import { freePort, RedisServer } from '../tests/helpers/redis.js';
import { agentDaemon, driverService, type ServiceProcess, TOKEN } from '../tests/helpers/services.js';
import {
  BENCH_FLAGS,
  MiB,
  benchFlags,
  commandLine,
  cpuSeconds,
  describeMachine,
  fmtNum,
  machineInfo,
  markdownTable,
  median,
  onCleanup,
  parseRateArg,
  parseSizeArg,
  positive,
  removeAtEnd,
  runMain,
  sleep,
  updateDocSection,
  writeResults,
} from './lib/common.js';

const SECTION = '## Fleet: one image to many nodes, peers off and on (loopback)';
const NETNS_SECTION = '## Fleet: one image to many nodes, peers off and on (network namespaces, shaped links)';
const USAGE = `usage: node dist/bench/fleet.js [--nodes 1,4,8] [--image-size SIZE] [--origin-rate RATE] [--node-rate RATE]
                                  [--reps N] [--quick] [--workdir DIR] [--keep] [--no-docs]
  --nodes        fleet sizes (default 1,4,8; --quick 1,4)
  --image-size   the image (default 64M; --quick 32M), 10% of it zeros
  --origin-rate  the origin's send cap, shared by the fleet (default 100mbit)
  --node-rate    each node's intake cap (default 100mbit)
  --netns        each agent in a network namespace of its own behind its own link, shaped
                 (tbf) to --node-rate down and --node-up up; the origin's link shaped to
                 --origin-rate (htb); no smartnic_bandwidth: the links are the caps. Root.
  --node-up      with --netns, each node's upload (default: --node-rate)
  --serve-share  with --netns, the agents' peers.serve_bandwidth as a share of --node-up
                 (default 0.9; 0: no cap)
  --reps         interleaved rounds (default 3; --quick 1)
  --peers        off, on or both (default both)
  --liar         a lying seed: the deployment that caches the image's manifest stays, its
                 target is damaged (one 4 KiB block in every 8th region with data) and it
                 serves those bytes as the image's; the fleet's disks must catch them,
                 report it and read those regions elsewhere (reported: wrong targets,
                 integrity failures, the origin's bytes)
  --monitor-ms   the driver's jobs.monitor_interval_ms (default 500: "all local" is the
                 monitor job's end, so this is its resolution; the polls cost the driver,
                 Redis and the agents CPU, which a large fleet on 2 cores feels: at 200 ms
                 and 32 nodes, 160 polls a second). The driver runs as deployed otherwise
                 (response_validation off)`;

interface Run {
  nodes: number;
  peers: boolean;
  round: number;
  origin_bytes: number;
  data_bytes: number;
  all_local_s: number;
  from_peers: number;
  cpu_agents_s: number;
  failed: number;
  /** Background reads that peers could not answer and the origin did (the disks' peers.fallbacks). */
  fallbacks: number;
  /** Seconds from the first create until each disk was local, in node order. */
  node_local_s: number[];
  /** Of those, by cause (the disks' peers.fallback_causes summed). */
  fallback_causes: { busy: number; refused: number; failed: number };
  /** Targets whose bytes are not the image's at the end (each target is compared whole). */
  wrong_targets: number;
  /** Regions that failed verification, over the fleet's disks (integrity_failures). */
  integrity_failures: number;
  /** With --liar: regions of the lying seed's target that were damaged. */
  damaged_regions?: number;
}

runMain('fleet', async () => {
  const { values: v } = parseArgs({ options: { ...BENCH_FLAGS, nodes: { type: 'string' }, 'image-size': { type: 'string' }, 'origin-rate': { type: 'string' }, 'node-rate': { type: 'string' }, reps: { type: 'string' }, peers: { type: 'string' }, 'monitor-ms': { type: 'string' }, netns: { type: 'boolean' }, 'node-up': { type: 'string' }, 'serve-share': { type: 'string' }, liar: { type: 'boolean' } } });
  const flags = benchFlags(v, USAGE);
  const sizes = (v.nodes ?? (flags.quick ? '1,4' : '1,4,8')).split(',').map((s) => positive('--nodes', s, 1, true));
  const imageSize = parseSizeArg(v['image-size'] ?? (flags.quick ? '32M' : '64M'), '--image-size');
  const originRate = parseRateArg(v["origin-rate"] ?? "100mbit", '--origin-rate');
  const nodeRate = parseRateArg(v["node-rate"] ?? "100mbit", '--node-rate');
  const reps = positive('--reps', v.reps, flags.quick ? 1 : 3, true);
  const maxNodes = Math.max(...sizes);
  const peerModes = ({ off: [false], on: [true], both: [false, true] } as Record<string, boolean[]>)[v.peers ?? 'both'];
  if (!peerModes) throw new Error(`--peers "${v.peers}": off, on or both`);
  const monitorMs = positive('--monitor-ms', v['monitor-ms'], 500, true);
  const netns = v.netns ?? false;
  const nodeUp = parseRateArg(v['node-up'] ?? v['node-rate'] ?? '100mbit', '--node-up');
  if ((v['node-up'] || v['serve-share']) && !netns) throw new Error('--node-up and --serve-share need --netns (on loopback a node\'s upload is not capped)');
  const liar = v.liar === true;
  const serveShare = Number(v['serve-share'] ?? 0.9);
  if (!(serveShare >= 0 && serveShare <= 1)) throw new Error(`--serve-share "${v['serve-share']}": a fraction from 0 to 1`);

  const dir = flags.workdir ?? fs.mkdtempSync(path.join(os.tmpdir(), 'bench-fleet-'));
  if (!flags.keep) removeAtEnd(dir);
  const m = await machineInfo(['redis-server']);
  console.error(`fleet: nodes ${sizes.join('/')}, image ${imageSize / MiB} MiB, origin ${fmtNum(originRate / MiB)} MiB/s, node ${fmtNum(nodeRate / MiB)} MiB/s, ${reps} round(s); ${describeMachine(m)}`);

  const redis = new RedisServer(path.join(dir, 'redis'));
  await redis.start();
  onCleanup(() => redis.stop());
  // Diagnostics (bench/README.md): the agents' log level, whose last MiB each is written to
  // FLEET_LOG_DIR at the end, and node flags (e.g. --cpu-prof --cpu-prof-dir=DIR).
  const logDir = process.env.FLEET_AGENT_LOG ? (process.env.FLEET_LOG_DIR ?? path.join(os.tmpdir(), 'fleet-logs')) : null;
  if (logDir) fs.mkdirSync(logDir, { recursive: true });
  let lab: NetLab | null = null;
  let originPort = 0;
  if (netns) {
    if (!NetLab.available()) throw new Error('--netns: cannot make network namespaces here (needs root with CAP_NET_ADMIN and iproute2)');
    const l = new NetLab();
    lab = l;
    onCleanup(() => {
      for (const f of l.stop()) console.error(`fleet: not removed: ${f}`);
    });
    l.start();
    originPort = await freePort();
    l.shapeFromRoot(originPort, originRate);
  }
  const agents: ServiceProcess[] = [];
  for (let i = 0; i < maxNodes; i++) {
    const host = lab?.addHost({ up: nodeUp, down: nodeRate });
    const serve = host && serveShare > 0 ? { peers: { serve_bandwidth: Math.round(nodeUp * serveShare) } } : {};
    const a = await agentDaemon({ dir: path.join(dir, `agent-${i}`), extra: { log_level: process.env.FLEET_AGENT_LOG ?? 'error', ...serve }, nodeFlags: process.env.FLEET_AGENT_NODE_FLAGS?.split(' ').filter(Boolean), ...(host ? { host: host.ip, port: 9611, wrap: host.exec } : {}) });
    await a.start();
    agents.push(a);
    onCleanup(async () => {
      await a.stop();
      if (logDir) fs.writeFileSync(path.join(logDir, `agent-${i}.log`), a.output);
    });
  }
  const drivers: Record<'on' | 'off', ServiceProcess> = {} as never;
  for (const mode of ['off', 'on'] as const) {
    const d = await driverService({ dir: path.join(dir, `driver-${mode}`), redisUrl: redis.url, jobs: { monitor_interval_ms: monitorMs }, extra: { peers: { enabled: mode === 'on' }, redis: { url: redis.url, prefix: `fleet-${mode}` }, log_level: 'error', response_validation: 'off' } });
    await d.start();
    drivers[mode] = d;
    onCleanup(async () => void (await d.stop()));
  }

  const runs: Run[] = [];
  let seq = 0;
  for (let round = 0; round < reps; round++) {
    for (const nodes of round % 2 === 0 ? sizes : [...sizes].reverse()) {
      // One node has no peer: it runs with peers off whatever --peers says (the reference).
      const modes = nodes === 1 ? [false] : round % 2 === 0 ? peerModes : [...peerModes].reverse();
      for (const peers of modes) {
        const r = await oneRun({ dir, seq: seq++, nodes, peers, round, imageSize, originRate, nodeRate, agents, driver: drivers[peers ? 'on' : 'off'], lab, originPort, liar: liar && peers });
        runs.push(r);
        console.error(`round ${round + 1}, ${nodes} node(s), peers ${peers ? 'on' : 'off'}: origin ${fmtNum(r.origin_bytes / r.data_bytes, 2)}× the image, all local in ${fmtNum(r.all_local_s, 1)} s, ${fmtNum(r.from_peers / MiB)} MiB from peers, ${r.fallbacks} fallbacks to the origin (${r.fallback_causes.busy} busy, ${r.fallback_causes.refused} refused, ${r.fallback_causes.failed} failed), agents ${fmtNum(r.cpu_agents_s, 1)} CPU-s, ${r.wrong_targets} wrong targets, ${r.integrity_failures} regions failed verification${r.damaged_regions !== undefined ? ` (${r.damaged_regions} damaged on the lying seed)` : ''}${r.failed ? `, ${r.failed} failed` : ''}`);
      }
    }
  }

  const single = median(runs.filter((r) => r.nodes === 1).map((r) => r.all_local_s));
  const rows: string[][] = [];
  const summary = [];
  for (const nodes of sizes) {
    for (const peers of [false, true]) {
      const rs = runs.filter((r) => r.nodes === nodes && r.peers === peers);
      if (rs.length === 0) continue;
      const originX = median(rs.map((r) => r.origin_bytes / r.data_bytes));
      const local = median(rs.map((r) => r.all_local_s));
      summary.push({ nodes, peers, origin_x: originX, all_local_s: local, vs_single: local / single, failed: rs.reduce((n, r) => n + r.failed, 0) });
      rows.push([String(nodes), peers ? 'on' : 'off', `${fmtNum(originX, 2)}×`, fmtNum(local, 1), `${fmtNum(local / single, 2)}×`, fmtNum(median(rs.map((r) => r.from_peers / r.data_bytes)), 2), fmtNum(median(rs.map((r) => r.cpu_agents_s)), 1), String(rs.reduce((n, r) => n + r.wrong_targets, 0)), String(rs.reduce((n, r) => n + r.integrity_failures, 0))]);
    }
  }
  const date = new Date();
  const cmd = commandLine();
  const file = writeResults('fleet', date, { command: cmd, quick: flags.quick, machine: m, netns, image_size: imageSize, origin_rate: originRate, node_rate: nodeRate, ...(netns ? { node_up: nodeUp, serve_share: serveShare } : {}), monitor_ms: monitorMs, driver_response_validation: 'off', liar, reps, runs, summary });
  const table = markdownTable(['nodes', 'peers', 'origin ÷ image', 'all local, s', 'vs one node', 'from peers ÷ image', 'agents CPU, s', 'wrong targets', 'regions failing verification'], ['r', 'l', 'r', 'r', 'r', 'r', 'r', 'r', 'r'], rows);
  console.log(table);
  if (flags.docs && !netns) {
    updateDocSection(
      SECTION,
      `${SECTION}

\`${cmd}\` — ${date.toISOString().slice(0, 10)}, ${describeMachine(m)}; results in \`${path.relative(path.join(path.dirname(file), '../..'), file)}\`.

N agent daemons on loopback, one driver service (peers.enabled off, then on: seeders 1,
origin_wait_ms 30 s), an origin capped at ${fmtNum(originRate / MiB)} MiB/s for the whole fleet, each
node's intake capped at ${fmtNum(nodeRate / MiB)} MiB/s (driver_info smartnic_bandwidth), a ${imageSize / MiB} MiB
image (10% zeros, never fetched) whose manifest is cached. All N disks are created at once;
"all local" is from the first create to the last disk complete. Medians of ${reps} interleaved
round(s). Not measured here: nodes' upload caps (only intake is capped), separate hosts.

${table}
`,
    );
  }
  if (flags.docs && netns) {
    // One section per link rate: the rate decides whether this machine's cores or the links
    // set the fleet's pace, and docs/fleet.md compares them.
    const mbit = Math.round((nodeRate * 8) / 1e6);
    const offOnly = !peerModes.includes(true);
    const heading = liar
      ? NETNS_SECTION.replace('peers off and on', 'a lying seed').replace('shaped links)', `${mbit} Mbit/s links)`)
      : offOnly
        ? NETNS_SECTION.replace('peers off and on', 'peers off').replace('shaped links)', `${mbit} Mbit/s links)`)
        : mbit === 100 ? NETNS_SECTION : NETNS_SECTION.replace('shaped links)', `${mbit} Mbit/s links)`);
    updateDocSection(
      heading,
      `${heading}

\`${cmd}\` — ${date.toISOString().slice(0, 10)}, ${describeMachine(m)}; results in \`${path.relative(path.join(path.dirname(file), '../..'), file)}\`.

N agent daemons, each in a network namespace of its own behind a veth link shaped (tbf) to
${fmtNum(nodeRate / MiB)} MiB/s down and ${fmtNum(nodeUp / MiB)} MiB/s up (serving peers capped at ${serveShare > 0 ? `${fmtNum((nodeUp * serveShare) / MiB)} MiB/s, peers.serve_bandwidth` : 'nothing'}), on one bridge; Redis, the driver service (peers.enabled off,
then on: seeders 1, origin_wait_ms 30 s) and the origin in the root namespace, the origin's
link shaped (htb) to ${fmtNum(originRate / MiB)} MiB/s for the whole fleet; jumbo frames (MTU 9000). No
smartnic_bandwidth: the links are the caps. A ${imageSize / MiB} MiB image (10% zeros, never fetched)
whose manifest is cached. All N disks are created at once; "all local" is from the first
create to the last disk complete. Medians of ${reps} interleaved round(s). Every agent shares
this machine's 2 cores. Each target is compared whole with the image at the end ("wrong
targets"; "regions failing verification" are the disks' integrity_failures).${liar ? ` A lying seed: the deployment that cached the manifest stays, listed as a seed, and one 4 KiB block in every 8th region of its target is damaged (${runs.find((r) => r.damaged_regions !== undefined)?.damaged_regions ?? '?'} regions): it serves them as the image's.` : ''}

${table}
`,
    );
    for (const f of fleetPlots()) console.error(`fleet: plot ${f}`);
  }
});

async function oneRun(c: { dir: string; seq: number; nodes: number; peers: boolean; round: number; imageSize: number; originRate: number; nodeRate: number; agents: ServiceProcess[]; driver: ServiceProcess; lab: NetLab | null; originPort: number; liar: boolean }): Promise<Run> {
  // A fresh image per run: no disk of an earlier run is a peer, and its manifest is built
  // (read once from an uncapped origin) before the fleet's count starts.
  const image = path.join(c.dir, `image-${c.seq}.raw`);
  makeImage(image, c.imageSize, 1000 + c.seq);
  const bytes = fs.readFileSync(image);
  const { createHash } = await import('node:crypto');
  const info = { image_os_hash_algo: 'sha512' as const, image_os_hash_value: createHash('sha512').update(bytes).digest('hex') };
  const api = new DriverClient({ baseUrl: c.driver.url, token: TOKEN });
  const target = (i: number, node: string): string => path.join(c.dir, `agent-${i}`, 'targets', `${node}.raw`);
  const warm = new TestOrigin({ file: image });
  const warmUrl = await warm.start(c.lab?.rootIp);
  const warmNode = `warm-${c.seq}`;
  let damaged: number | undefined;
  try {
    await api.createDeployment({ node_uuid: warmNode, instance_info: { image_source: warmUrl, ...info }, driver_info: { smartnic_agent_url: c.agents[0]!.url, smartnic_target: target(0, warmNode), smartnic_require_verification: true } });
    await waitAll(api, [warmNode], 10 * 60_000);
    if (c.liar) {
      // It stays, listed as a seed once verified, and its target is damaged behind its
      // agent's back: it serves those bytes as the image's.
      for (;;) {
        const d = await api.getDeployment(warmNode);
        if (d.peers?.listed_until) break;
        await sleep(200);
      }
      damaged = damageTarget(target(0, warmNode), bytes);
    } else {
      await api.deleteDeployment(warmNode);
      await gone(api, [warmNode]);
    }
  } finally {
    await warm.stop();
  }
  // In namespaces the origin's link is the cap (NetLab.shapeFromRoot on its port); on
  // loopback the origin paces itself.
  const origin = new TestOrigin({ file: image, ...(c.lab ? {} : { rate: c.originRate }) });
  const url = c.lab ? await origin.start(c.lab.rootIp, c.originPort) : await origin.start();
  try {
    const nodes = Array.from({ length: c.nodes }, (_, i) => `n${c.seq}-${i}`);
    const cpu = (): number => c.agents.slice(0, c.nodes).reduce((s, a) => s + cpuSeconds(a.child!.pid!), 0);
    const cpu0 = cpu();
    const t0 = Date.now();
    await Promise.all(
      nodes.map((node, i) =>
        api.createDeployment({
          node_uuid: node,
          instance_info: { image_source: url, ...info },
          driver_info: { smartnic_agent_url: c.agents[i]!.url, smartnic_target: target(i, node), ...(c.lab ? {} : { smartnic_bandwidth: Math.round(c.nodeRate) }) },
        }),
      ),
    );
    const done = await waitAll(api, nodes, 60 * 60_000);
    const localAt = done.map((d) => (Date.parse(d.jobs.find((j) => j.queue === 'monitor')?.finished_at ?? d.updated_at) - t0) / 1000);
    const last = t0 + Math.max(...localAt) * 1000;
    let data = 0;
    const region = 1 << 20;
    for (let o = 0; o < bytes.length; o += region) if (bytes.subarray(o, o + region).some((b) => b !== 0)) data += Math.min(region, bytes.length - o);
    const fromPeers = done.reduce((n, d) => n + (d.peers?.bytes_from_peers ?? 0), 0);
    const views = await Promise.all(done.map((d, i) => new AgentClient({ baseUrl: c.agents[i]!.url, token: TOKEN }).getDisk(d.disk_id)));
    if (process.env.FLEET_AGENT_LOG) for (const [i, v] of views.entries()) console.error(`  ${v.id}: local at ${localAt[i]!.toFixed(1)} s, ${v.bytes_fetched} bytes from the origin, ${v.peers.bytes_from_peers} from peers, fallbacks ${JSON.stringify(v.peers.fallback_causes)}`);
    // No wrong byte: every target is the image, compared whole (after the timed window).
    let wrong = 0;
    for (const [i, node] of nodes.entries()) if (!fs.readFileSync(target(i, node)).subarray(0, bytes.length).equals(bytes)) wrong++;
    const r: Run = { wrong_targets: wrong, integrity_failures: views.reduce((n, d) => n + d.integrity_failures, 0), ...(damaged !== undefined ? { damaged_regions: damaged } : {}), node_local_s: localAt, nodes: c.nodes, peers: c.peers, round: c.round, origin_bytes: origin.stats.bytesSent, data_bytes: data, all_local_s: (last - t0) / 1000, from_peers: fromPeers, cpu_agents_s: cpu() - cpu0, failed: done.filter((d) => d.state === 'failed').length, fallbacks: views.reduce((n, d) => n + d.peers.fallbacks, 0), fallback_causes: { busy: views.reduce((n, d) => n + d.peers.fallback_causes.busy, 0), refused: views.reduce((n, d) => n + d.peers.fallback_causes.refused, 0), failed: views.reduce((n, d) => n + d.peers.fallback_causes.failed, 0) } };
    const all = damaged !== undefined ? [...nodes, warmNode] : nodes;
    for (const node of all) await api.deleteDeployment(node);
    await gone(api, all);
    fs.rmSync(image);
    return r;
  } finally {
    await origin.stop();
  }
}

/** Damages one 4 KiB block in every 8th region with data of the target at `file`; how many. */
function damageTarget(file: string, image: Buffer): number {
  const region = 1 << 20;
  const fd = fs.openSync(file, 'r+');
  let n = 0;
  try {
    let withData = 0;
    for (let o = 0; o < image.length; o += region) {
      if (!image.subarray(o, o + region).some((b) => b !== 0)) continue;
      if (withData++ % 8 !== 0) continue;
      fs.writeSync(fd, Buffer.alloc(4096, 0xee), 0, 4096, o + 8192);
      n++;
    }
    fs.fdatasyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
  return n;
}

async function waitAll(api: DriverClient, nodes: string[], timeoutMs: number): Promise<Awaited<ReturnType<DriverClient['getDeployment']>>[]> {
  const deadline = Date.now() + timeoutMs;
  const ended = new Map<string, Awaited<ReturnType<DriverClient['getDeployment']>>>();
  for (;;) {
    // Only the deployments still going are asked again, once a second: the times come from
    // the monitor jobs' ends, not from when this loop sees them, and a fleet's polls cost
    // the driver (and Redis) CPU that the agents on these 2 cores need.
    const going = nodes.filter((n) => !ended.has(n));
    const ds = await Promise.all(going.map((n) => api.getDeployment(n)));
    // The monitor job ends once the disk is complete (and, with peers, verified): its finish time is "all local".
    for (const [i, d] of ds.entries()) if (d.state === 'failed' || (d.state === 'complete' && d.jobs.some((j) => j.queue === 'monitor' && j.finished_at))) ended.set(going[i]!, d);
    if (ended.size === nodes.length) return nodes.map((n) => ended.get(n)!);
    if (Date.now() > deadline) throw new Error(`not complete after ${timeoutMs / 1000} s: ${nodes.filter((n) => !ended.has(n)).join(', ')}`);
    await sleep(1000);
  }
}

async function gone(api: DriverClient, nodes: string[]): Promise<void> {
  for (;;) {
    const left = (await api.listDeployments()).filter((d) => nodes.includes(d.node_uuid));
    if (left.length === 0) return;
    await sleep(200);
  }
}

/**
 * Control-plane benchmark (issue #15, part 5): many deployments at once through one and
 * through two driver processes, on one Redis, with a few agent daemons that each hold many
 * small disks. What it measures for each run:
 *
 *  - the API's answer to a create (acknowledgement) latency, p50/p99;
 *  - creation → ready: from the moment the create was sent to the attach job's
 *    `finished_at` (the API reports it; the attach job finishes when the deployment is
 *    ready), p50/p99; creation → complete the same with the monitor job;
 *  - throughput: deployments ready per second over the burst, and jobs finished per
 *    second (attach + monitor + the one manifest build);
 *  - Redis memory per live deployment (MEMORY USAGE of every key once every deployment is
 *    complete, less before the burst, over N);
 *  - CPU seconds of the driver processes, Redis and the agents over the burst;
 *  - teardown: every deployment deleted at once, time until the list is empty.
 *
 * The creates are sent round-robin to the driver processes, as a load balancer would;
 * every process runs workers. Job settings are the production defaults (jobs.concurrency 8
 * per queue and process, monitor polls every 2 s). The image is small (`--image-size`) so
 * the figures are the control plane's, not the data plane's. Runs alternate between one and
 * two drivers, `--reps` rounds, medians reported; a fresh Redis database and fresh driver
 * processes for every run.
 *
 *   flock /tmp/heavy.lock node dist/bench/control-plane.js            # 200 deployments, 3 rounds
 *   flock /tmp/heavy.lock node dist/bench/control-plane.js --quick    # 20 deployments, 1 round
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { Redis } from 'ioredis';
import { AgentClient } from '../openapi/clients/agent-client.js';
import { DriverClient, type Deployment } from '../openapi/clients/driver-client.js';
import { makeImage } from '../tests/helpers/agent.js';
import { TestOrigin } from '../tests/helpers/origin.js';
import { RedisServer } from '../tests/helpers/redis.js';
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
  parseSizeArg,
  percentile,
  positive,
  removeAtEnd,
  runMain,
  sleep,
  updateDocSection,
  writeResults,
} from './lib/common.js';

const SECTION = '## Control plane: concurrent deployments through one and two driver processes';
const USAGE = `usage: node dist/bench/control-plane.js [--deployments N] [--agents N] [--drivers 1,2] [--reps N]
                                         [--image-size SIZE] [--poll-ms MS] [--quick] [--workdir DIR] [--keep] [--no-docs]
  --deployments   deployments created at once per run (default 200; --quick 20)
  --agents        agent daemons the disks are spread over (default 4)
  --drivers       driver process counts to compare (default 1,2)
  --reps          rounds; each runs every driver count once (default 3; --quick 1)
  --image-size    the image every deployment streams (default 1M: the control plane's work, little data-plane work)
  --poll-ms       how often the bench lists the deployments (default 1000; latencies come from job finish times, not polls)`;

interface RunResult {
  drivers: number;
  round: number;
  deployments: number;
  errors: string[];
  ack_ms: { p50: number; p99: number };
  ready_s: { p50: number; p99: number; max: number };
  complete_s: { p50: number; p99: number; max: number };
  ready_per_s: number;
  jobs_per_s: number;
  redis_bytes_per_deployment: number;
  cpu_s: { drivers: number; redis: number; agents: number };
  teardown_s: number;
  /** Attach jobs that needed more than one attempt. */
  attach_retried: number;
}

runMain('control-plane', async () => {
  const { values: v } = parseArgs({
    options: { ...BENCH_FLAGS, deployments: { type: 'string' }, agents: { type: 'string' }, drivers: { type: 'string' }, reps: { type: 'string' }, 'image-size': { type: 'string' }, 'poll-ms': { type: 'string' } },
  });
  const flags = benchFlags(v, USAGE);
  const n = positive('--deployments', v.deployments, flags.quick ? 20 : 200, true);
  const agentsN = positive('--agents', v.agents, 4, true);
  const reps = positive('--reps', v.reps, flags.quick ? 1 : 3, true);
  const imageSize = parseSizeArg(v['image-size'] ?? '1M', '--image-size');
  const pollMs = positive('--poll-ms', v['poll-ms'], 1000, true);
  const driverCounts = (v.drivers ?? '1,2').split(',').map((s) => positive('--drivers', s, 1, true));

  const dir = flags.workdir ?? fs.mkdtempSync(path.join(os.tmpdir(), 'bench-control-plane-'));
  if (!flags.keep) removeAtEnd(dir);
  const image = path.join(dir, 'image.raw');
  makeImage(image, imageSize, 7);
  const origin = new TestOrigin({ file: image });
  await origin.start();
  onCleanup(() => origin.stop());
  // Production-like persistence: an append-only file fsynced every second.
  const redisServer = new RedisServer(path.join(dir, 'redis'), ['--appendfsync', 'everysec']);
  await redisServer.start();
  onCleanup(() => redisServer.stop());
  const redis = new Redis(redisServer.url);
  onCleanup(() => redis.disconnect());
  const agents: ServiceProcess[] = [];
  for (let i = 0; i < agentsN; i++) {
    const a = await agentDaemon({ dir: path.join(dir, `agent-${i}`), extra: { log_level: 'error' } });
    await a.start();
    agents.push(a);
    onCleanup(async () => void (await a.stop()));
  }
  const m = await machineInfo(['redis-server']);
  console.error(`control-plane: ${n} deployments, ${agentsN} agents, drivers ${driverCounts.join('/')}, ${reps} round(s); ${describeMachine(m)}`);

  // A warm-up run, not counted: the first burst on fresh processes pays for compiling.
  await oneRun({ dir, round: -1, drivers: driverCounts[0]!, n, imageSize, pollMs, origin, redis, redisServer, agents });
  const runs: RunResult[] = [];
  for (let round = 0; round < reps; round++) {
    // Alternate which driver count goes first, so neither always runs on a warmer machine.
    const order = round % 2 === 0 ? driverCounts : [...driverCounts].reverse();
    for (const drivers of order) {
      const r = await oneRun({ dir, round, drivers, n, imageSize, pollMs, origin, redis, redisServer, agents });
      runs.push(r);
      console.error(
        `round ${round + 1}, ${drivers} driver(s): ack p50 ${fmtNum(r.ack_ms.p50)} ms; ready p50/p99 ${fmtNum(r.ready_s.p50, 2)}/${fmtNum(r.ready_s.p99, 2)} s; complete p50/p99 ${fmtNum(r.complete_s.p50, 2)}/${fmtNum(r.complete_s.p99, 2)} s; ` +
          `${fmtNum(r.ready_per_s)} ready/s, ${fmtNum(r.jobs_per_s)} jobs/s; Redis ${fmtNum(r.redis_bytes_per_deployment, 0)} B/deployment; CPU drivers ${fmtNum(r.cpu_s.drivers)} s; teardown ${fmtNum(r.teardown_s)} s; ${r.attach_retried} attach retries${r.errors.length ? `; ${r.errors.length} errors` : ''}`,
      );
    }
  }

  const date = new Date();
  const cmd = commandLine();
  const summary = driverCounts.map((d) => {
    const rs = runs.filter((r) => r.drivers === d);
    const med = (f: (r: RunResult) => number): number => median(rs.map(f));
    return {
      drivers: d,
      ack_p50_ms: med((r) => r.ack_ms.p50),
      ack_p99_ms: med((r) => r.ack_ms.p99),
      ready_p50_s: med((r) => r.ready_s.p50),
      ready_p99_s: med((r) => r.ready_s.p99),
      complete_p50_s: med((r) => r.complete_s.p50),
      complete_p99_s: med((r) => r.complete_s.p99),
      ready_per_s: med((r) => r.ready_per_s),
      jobs_per_s: med((r) => r.jobs_per_s),
      redis_bytes_per_deployment: med((r) => r.redis_bytes_per_deployment),
      cpu_drivers_s: med((r) => r.cpu_s.drivers),
      cpu_redis_s: med((r) => r.cpu_s.redis),
      cpu_agents_s: med((r) => r.cpu_s.agents),
      teardown_s: med((r) => r.teardown_s),
      attach_retried: rs.reduce((a, r) => a + r.attach_retried, 0),
      errors: rs.reduce((a, r) => a + r.errors.length, 0),
    };
  });
  const rawRel = writeResults('control-plane', date, { command: cmd, date: date.toISOString(), options: { n, agents: agentsN, reps, imageSize, pollMs, driverCounts }, machine: m, runs, summary });
  console.error(`results: ${rawRel}`);
  if (!flags.docs) return;
  const table = markdownTable(
    ['driver processes', 'create answered p50 / p99', 'creation → ready p50 / p99', 'creation → complete p50 / p99', 'ready per s', 'jobs per s', 'Redis per deployment', 'CPU: drivers / Redis / agents', 'teardown of all', 'errors / attach retries'],
    ['l', 'r', 'r', 'r', 'r', 'r', 'r', 'r', 'r', 'r'],
    summary.map((s) => [
      String(s.drivers),
      `${fmtNum(s.ack_p50_ms)} / ${fmtNum(s.ack_p99_ms)} ms`,
      `${fmtNum(s.ready_p50_s, 2)} / ${fmtNum(s.ready_p99_s, 2)} s`,
      `${fmtNum(s.complete_p50_s, 2)} / ${fmtNum(s.complete_p99_s, 2)} s`,
      fmtNum(s.ready_per_s),
      fmtNum(s.jobs_per_s),
      `${fmtNum(s.redis_bytes_per_deployment / 1024, 1)} KiB`,
      `${fmtNum(s.cpu_drivers_s)} / ${fmtNum(s.cpu_redis_s)} / ${fmtNum(s.cpu_agents_s)} s`,
      `${fmtNum(s.teardown_s)} s`,
      `${s.errors} / ${s.attach_retried}`,
    ]),
  );
  updateDocSection(
    SECTION,
    `${SECTION}

\`${cmd}\` — ${date.toISOString()}; ${describeMachine(m)}. Raw runs: \`${rawRel}\`.

${n} deployments created at once (the creates sent round-robin to the driver processes, as a
load balancer would), each streaming a ${imageSize / MiB} MiB image from one local origin to one of
${agentsN} agent daemons (${Math.ceil(n / agentsN)} disks each), on one Redis (append-only file,
fsync every second). Production job settings: 8 jobs at a time per queue and process, a
monitor poll every 2 s. Latencies are from the moment a create was sent to its attach job's
\`finished_at\` (ready) and its monitor job's (complete), as the API reports them. Medians of
${reps} round(s), one and two processes alternating; a fresh Redis database and fresh driver
processes for every run.

${table}

- **create answered**: the API's 201 (record written, attach job queued).
- **ready per s**: deployments ready over the burst (N ÷ (last ready − first create));
  **jobs per s**: attach, monitor and manifest jobs finished over the same span.
- **Redis per deployment**: \`MEMORY USAGE\` of every key once every deployment is
  complete, less before the burst, over N: records, job hashes, queue indexes, event-stream
  entries, and a share of what is per image (the manifest, the boot profile).
- On this machine the driver processes, Redis, the agents and the origin share 2 cores, so a
  second driver process adds workers but no CPU: what it shows is whether the control plane
  keeps its latencies when load is spread, not the scaling a second host gives. The CPU
  column says where the cores went.
`,
  );
});

async function oneRun(c: {
  dir: string;
  round: number;
  drivers: number;
  n: number;
  imageSize: number;
  pollMs: number;
  origin: TestOrigin;
  redis: Redis;
  redisServer: RedisServer;
  agents: ServiceProcess[];
}): Promise<RunResult> {
  await c.redis.flushall();
  const procs: ServiceProcess[] = [];
  for (let i = 0; i < c.drivers; i++) {
    const d = await driverService({
      dir: path.join(c.dir, `driver-r${c.round}-${c.drivers}-${i}`),
      redisUrl: c.redisServer.url,
      // The production defaults, not the tests' fast ones.
      jobs: { attach_attempts: 8, teardown_attempts: 12, backoff_ms: 1000, monitor_interval_ms: 2000 },
      extra: { redis: { url: c.redisServer.url, prefix: 'bench' }, response_validation: 'off', log_level: 'warn' },
    });
    await d.start();
    procs.push(d);
  }
  try {
    const apis = procs.map((p) => new DriverClient({ baseUrl: p.url, token: TOKEN, timeoutMs: 120_000 }));
    const agentApis = c.agents.map((a) => new AgentClient({ baseUrl: a.url, token: TOKEN }));
    const pids = { drivers: procs.map((p) => p.child!.pid!), redis: c.redisServer.pid!, agents: c.agents.map((a) => a.child!.pid!) };
    const cpu = (): { drivers: number; redis: number; agents: number } => ({
      drivers: pids.drivers.reduce((a, p) => a + cpuSeconds(p), 0),
      redis: cpuSeconds(pids.redis),
      agents: pids.agents.reduce((a, p) => a + cpuSeconds(p), 0),
    });
    // Every key's MEMORY USAGE (keys, values, their encodings): unlike INFO's dataset
    // figure, not moved by the allocator or by scripts cached on a fresh server.
    const datasetBytes = async (): Promise<number> => {
      let total = 0;
      for await (const keys of c.redis.scanStream({ count: 500 }) as AsyncIterable<string[]>) {
        for (const k of keys) total += Number((await c.redis.call('MEMORY', 'USAGE', k, 'SAMPLES', '0')) ?? 0);
      }
      return total;
    };
    const before = await datasetBytes();
    const cpu0 = cpu();
    const nodes = Array.from({ length: c.n }, (_, i) => `bench-node-${String(i).padStart(4, '0')}`);
    const sent = new Map<string, number>();
    const errors: string[] = [];
    const acks: number[] = [];
    const t0 = Date.now();
    await Promise.all(
      nodes.map(async (node, i) => {
        const at = Date.now();
        sent.set(node, at);
        try {
          await apis[i % apis.length]!.createDeployment({
            node_uuid: node,
            deployment_id: 'd1',
            instance_info: { image_source: c.origin.url },
            driver_info: { smartnic_agent_url: c.agents[i % c.agents.length]!.url, smartnic_target: path.join(c.dir, `agent-${i % c.agents.length}`, 'targets', `${node}.raw`) },
          });
          acks.push(Date.now() - at);
        } catch (err) {
          errors.push(`create ${node}: ${(err as Error).message}`);
        }
      }),
    );
    // Until every acknowledged deployment is complete (or failed, counted as an error).
    let list: Deployment[] = [];
    const deadline = Date.now() + 30 * 60_000;
    for (;;) {
      list = await apis[0]!.listDeployments();
      if (list.every((d) => d.state === 'complete' || d.state === 'failed')) break;
      if (Date.now() > deadline) throw new Error(`not complete after 30 min: ${list.filter((d) => d.state !== 'complete').length} left`);
      await sleep(c.pollMs);
    }
    const after = await datasetBytes();
    const cpu1 = cpu();
    for (const d of list.filter((x) => x.state === 'failed')) errors.push(`${d.node_uuid} failed: ${d.last_error}`);
    const finished = (d: Deployment, q: string): number | null => {
      const at = d.jobs.find((j) => j.queue === q)?.finished_at;
      return at ? Date.parse(at) : null;
    };
    const ready: number[] = [];
    const complete: number[] = [];
    const allFinishes: number[] = [];
    for (const d of list) {
      const s = sent.get(d.node_uuid)!;
      const a = finished(d, 'attach');
      const mo = finished(d, 'monitor');
      if (a !== null) ready.push((a - s) / 1000);
      if (mo !== null) complete.push((mo - s) / 1000);
      for (const q of ['attach', 'monitor']) {
        const f = finished(d, q);
        if (f !== null) allFinishes.push(f);
      }
    }
    const manifest = list.map((d) => finished(d, 'manifest')).find((x) => x !== null);
    if (manifest) allFinishes.push(manifest);
    const lastReady = Math.max(...ready) * 1000 + t0;
    const readyPerS = ready.length / ((lastReady - t0) / 1000);
    const jobsPerS = allFinishes.length / ((Math.max(...allFinishes) - t0) / 1000);

    // Teardown: every deployment deleted at once; until the list is empty.
    const t1 = Date.now();
    await Promise.all(
      list.map(async (d, i) => {
        try {
          await apis[i % apis.length]!.deleteDeployment(d.node_uuid);
        } catch (err) {
          errors.push(`delete ${d.node_uuid}: ${(err as Error).message}`);
        }
      }),
    );
    for (;;) {
      const left = (await apis[0]!.listDeployments()).length;
      if (left === 0) break;
      if (Date.now() - t1 > 10 * 60_000) throw new Error(`teardown: ${left} deployments left after 10 min`);
      await sleep(Math.min(c.pollMs, 200)); // the list shrinks as it goes: poll it finely
    }
    const teardownS = (Date.now() - t1) / 1000;
    for (const a of agentApis) {
      const left = (await a.listDisks()).length;
      if (left) errors.push(`an agent kept ${left} disks after teardown`);
    }
    return {
      drivers: c.drivers,
      round: c.round,
      deployments: c.n,
      errors,
      ack_ms: { p50: percentile(acks, 50), p99: percentile(acks, 99) },
      ready_s: { p50: percentile(ready, 50), p99: percentile(ready, 99), max: Math.max(...ready) },
      complete_s: { p50: percentile(complete, 50), p99: percentile(complete, 99), max: Math.max(...complete) },
      ready_per_s: readyPerS,
      jobs_per_s: jobsPerS,
      redis_bytes_per_deployment: (after - before) / c.n,
      cpu_s: { drivers: cpu1.drivers - cpu0.drivers, redis: cpu1.redis - cpu0.redis, agents: cpu1.agents - cpu0.agents },
      teardown_s: teardownS,
      attach_retried: list.filter((d) => (d.jobs.find((j) => j.queue === 'attach')?.attempts ?? 0) > 1).length,
    };
  } finally {
    for (const p of procs) await p.stop();
  }
}

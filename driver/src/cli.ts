/**
 * `smartnic-driver`: `serve` runs the service; `jobs` inspects and repairs the same queues
 * from a shell (what bull-board shows, for operators without a browser); `reconcile` runs
 * one reconcile pass now (what the service does every reconcile.interval_ms).
 */
import { readFileSync } from 'node:fs';
import { parseArgs } from 'node:util';
import { type Job, Queue } from 'bullmq';
import { pino } from 'pino';
import { ConfigError, renderConfigDocs } from '../../common/src/config.js';
import { DRIVER_CONFIG_SCHEMA, type DriverConfig, resolveDriverConfig } from './config.js';
import { DriverError } from './errors.js';
import { type JobData, QUEUE_NAMES, type QueueName } from './queues.js';
import { Reconciler } from './reconcile.js';
import { connectRedis, describeRedis } from './redis-connect.js';
import { startDriverService } from './service.js';
import { DeploymentStore } from './store.js';

const DEFAULT_CONFIG = '/etc/smartnic/driver.yaml';

const HELP = `Usage: smartnic-driver <command> [--config FILE]

Commands:
  serve                          Run the REST API and the job workers (SIGTERM stops cleanly)
  jobs list [--queue Q] [--state S] [--limit N]
                                 Jobs per queue (Q: attach, monitor, teardown, manifest,
                                 clean; S: waiting, active, delayed, completed, failed)
  jobs show ID                   One job: data, state, attempts, progress, result or error
  jobs retry ID                  Retry a failed job
  jobs clean [--queue Q] [--state completed|failed] [--grace SECONDS]
                                 Remove finished jobs older than the grace period (default 3600)
  reconcile [--dry-run]          One reconcile pass now: list the agents' disks, report orphans
                                 (disks no deployment names), remove those past reconcile.grace_ms
                                 if reconcile.remove_orphans (not with --dry-run); exit 0, or 1 if
                                 an agent could not be listed
  reconcile forget AGENT_URL     Stop scanning a decommissioned agent (one no deployment names)

Options:
  --config FILE   YAML/JSON config (default ${DEFAULT_CONFIG}); keys:

${renderConfigDocs(DRIVER_CONFIG_SCHEMA)}`;

export async function main(argv: string[]): Promise<number> {
  let parsed;
  try {
    parsed = parseArgs({
      args: argv,
      allowPositionals: true,
      options: {
        config: { type: 'string', default: DEFAULT_CONFIG },
        queue: { type: 'string' },
        state: { type: 'string' },
        limit: { type: 'string', default: '20' },
        grace: { type: 'string', default: '3600' },
        'dry-run': { type: 'boolean' },
        help: { type: 'boolean' },
        version: { type: 'boolean' },
      },
    });
  } catch (err) {
    process.stderr.write(`smartnic-driver: ${(err as Error).message}\n`);
    return 2;
  }
  const { values, positionals } = parsed;
  if (values.version) {
    process.stdout.write(`${version()}\n`);
    return 0;
  }
  const [command, sub, arg] = positionals;
  if (values.help || !command) {
    process.stdout.write(HELP);
    return command || values.help ? 0 : 2;
  }
  try {
    const config = resolveDriverConfig({ file: values.config! });
    if (command === 'serve') return await serve(config);
    if (command === 'jobs') return await jobs(config, sub, arg, values);
    if (command === 'reconcile') return await reconcile(config, sub, arg, values['dry-run'] ?? false);
    process.stderr.write(`smartnic-driver: unknown command "${command}"; see --help\n`);
    return 2;
  } catch (err) {
    if (err instanceof ConfigError) {
      process.stderr.write(`smartnic-driver: DRV_ERR_CONFIG: ${err.message}\n`);
      return 2;
    }
    if (err instanceof DriverError && err.code === 'DRV_ERR_REDIS_UNFIT') {
      process.stderr.write(`smartnic-driver: ${err.code}: ${err.message}\n`);
      return 2;
    }
    process.stderr.write(`smartnic-driver: ${(err as Error).message}\n`);
    return 1;
  }
}

async function serve(config: Readonly<DriverConfig>): Promise<number> {
  const log = pino({
    level: config.log_level,
    redact: { paths: ['req.headers.authorization', 'req.headers["x-auth-token"]', '*.smartnic_agent_token', '*.token'], censor: 'REDACTED' },
  });
  const service = await startDriverService(config, log, { version: version() });
  process.stdout.write(JSON.stringify({ event: 'listening', url: service.url }) + '\n');
  log.info({ url: service.url, redis: describeRedis(config.redis), auth: config.auth.tokens.length > 0 }, 'driver service listening');
  await new Promise<void>((resolve) => {
    process.once('SIGTERM', () => resolve());
    process.once('SIGINT', () => resolve());
  });
  log.info('stopping');
  await service.close();
  log.info('stopped');
  // Everything the service owns is closed. With Redis unreachable, client libraries keep
  // reconnect timers of their own alive; they must not keep a stopped daemon running.
  setTimeout(() => process.exit(0), 500).unref();
  return 0;
}

async function jobs(config: Readonly<DriverConfig>, sub: string | undefined, arg: string | undefined, o: { queue?: string; state?: string; limit?: string; grace?: string }): Promise<number> {
  const redis = connectRedis(config.redis, 'fail-fast');
  const queues = Object.fromEntries(QUEUE_NAMES.map((q) => [q, new Queue<JobData>(q, { connection: redis, prefix: config.redis.prefix })])) as Record<QueueName, Queue<JobData>>;
  const pick = (): QueueName[] => {
    if (!o.queue) return [...QUEUE_NAMES];
    if (!(QUEUE_NAMES as readonly string[]).includes(o.queue)) throw new Error(`--queue "${o.queue}" is not one of ${QUEUE_NAMES.join(', ')}`);
    return [o.queue as QueueName];
  };
  const find = async (id: string): Promise<Job<JobData>> => {
    for (const q of QUEUE_NAMES) {
      const job = await queues[q].getJob(id);
      if (job) return job;
    }
    throw new Error(`no job with id "${id}" in ${QUEUE_NAMES.join(', ')}`);
  };
  try {
    switch (sub) {
      case 'list': {
        const states = o.state ? [o.state] : ['active', 'waiting', 'delayed', 'failed', 'completed'];
        const limit = Number(o.limit);
        for (const q of pick()) {
          const counts = await queues[q].getJobCounts('waiting', 'active', 'delayed', 'completed', 'failed');
          process.stdout.write(`${q}: ${Object.entries(counts).map(([k, v]) => `${v} ${k}`).join(', ')}\n`);
          const list = await queues[q].getJobs(states as never, 0, limit - 1);
          for (const j of list) {
            const state = await j.getState();
            const progress = typeof j.progress === 'number' ? ` ${j.progress}%` : '';
            const why = j.failedReason ? `  ${j.failedReason}` : '';
            process.stdout.write(`  ${j.id}  ${state}${progress}  attempts ${j.attemptsMade}/${j.opts.attempts ?? 1}${why}\n`);
          }
        }
        return 0;
      }
      case 'show': {
        if (!arg) throw new Error('jobs show needs a job id (see "jobs list")');
        const j = await find(arg);
        const out = {
          id: j.id,
          queue: j.queueName,
          state: await j.getState(),
          data: j.data,
          attempts: `${j.attemptsMade}/${j.opts.attempts ?? 1}`,
          progress: j.progress,
          created: new Date(j.timestamp).toISOString(),
          processed: j.processedOn ? new Date(j.processedOn).toISOString() : null,
          finished: j.finishedOn ? new Date(j.finishedOn).toISOString() : null,
          result: j.returnvalue ?? null,
          error: j.failedReason || null,
        };
        process.stdout.write(JSON.stringify(out, null, 2) + '\n');
        return 0;
      }
      case 'retry': {
        if (!arg) throw new Error('jobs retry needs a job id');
        const j = await find(arg);
        const state = await j.getState();
        if (state !== 'failed') throw new Error(`job ${arg} is ${state}, not failed: only failed jobs are retried`);
        await j.retry();
        process.stdout.write(`retrying ${arg}\n`);
        return 0;
      }
      case 'clean': {
        const state = o.state ?? 'completed';
        if (state !== 'completed' && state !== 'failed') throw new Error(`--state "${state}": only completed or failed jobs are cleaned`);
        const grace = Number(o.grace) * 1000;
        if (!Number.isFinite(grace) || grace < 0) throw new Error(`--grace "${o.grace}" is not a number of seconds`);
        for (const q of pick()) {
          const removed = await queues[q].clean(grace, 10_000, state);
          process.stdout.write(`${q}: removed ${removed.length} ${state} job(s)\n`);
        }
        return 0;
      }
      default:
        throw new Error(`"jobs ${sub ?? ''}": use jobs list, show ID, retry ID or clean`);
    }
  } finally {
    await Promise.all(QUEUE_NAMES.map((q) => queues[q].close()));
    redis.disconnect();
  }
}

async function reconcile(config: Readonly<DriverConfig>, sub: string | undefined, arg: string | undefined, dryRun: boolean): Promise<number> {
  if (sub !== undefined && sub !== 'forget') throw new Error(`"reconcile ${sub}": use reconcile [--dry-run] or reconcile forget AGENT_URL`);
  const redis = connectRedis(config.redis, 'patient');
  redis.on('error', () => undefined);
  try {
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`Redis at ${describeRedis(config.redis)} does not answer`)), 10_000);
      redis.once('ready', () => {
        clearTimeout(timer);
        resolve();
      });
    });
    const log = pino({ level: config.log_level }, pino.destination(2));
    const reconciler = new Reconciler({ redis, store: new DeploymentStore(redis, config.redis.prefix), config, log });
    if (sub === 'forget') {
      if (!arg) throw new Error('reconcile forget needs the agent URL (as GET /v1/orphans lists it)');
      const known = await reconciler.rs.forget(arg);
      process.stdout.write(known ? `forgot ${arg}\n` : `${arg} was not registered\n`);
      return 0;
    }
    const r = await reconciler.runOnce({ dryRun });
    const orphans = await reconciler.rs.orphans();
    const scans = await reconciler.rs.scans();
    process.stdout.write(`reconcile: ${r.agents} agent(s), ${r.agents_failed} not listed; ${r.orphans} orphan disk(s), ${r.removed} removed; ${r.records_failed} complete deployment(s) marked failed (disk gone)${dryRun ? ' [dry run]' : ''}\n`);
    for (const o of orphans) {
      const after = config.reconcile.remove_orphans ? `removable after ${new Date(Date.parse(o.first_seen_at) + config.reconcile.grace_ms).toISOString()}` : 'kept (reconcile.remove_orphans is false)';
      process.stdout.write(`  orphan  ${o.agent_url}  ${o.disk_id}  ${o.state}  ${o.size} bytes  ${o.target}  since ${o.first_seen_at}  ${after}${o.last_error ? `  last error: ${o.last_error}` : ''}\n`);
    }
    for (const s of scans.filter((x) => x.error)) process.stdout.write(`  agent   ${s.agent_url}  not listed: ${s.error}\n`);
    if (r.removal_held) process.stdout.write(`  held    ${r.removal_held}\n`);
    return r.agents_failed ? 1 : 0;
  } finally {
    redis.disconnect();
  }
}

function version(): string {
  return (JSON.parse(readFileSync(new URL('../../../driver/package.json', import.meta.url), 'utf8')) as { version: string }).version;
}

/**
 * The REST API (openapi/driver.yaml), built separately from listening so tests run it
 * in-process (STYLE.md principle 9). Routes, validation and authentication come from the
 * OpenAPI document (openapi/server.ts); this file holds the handlers.
 */
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import { createBullBoard } from '@bull-board/api';
import { BullMQAdapter } from '@bull-board/api/bullMQAdapter';
import { FastifyAdapter } from '@bull-board/fastify';
import Fastify, { type FastifyError, type FastifyInstance, type FastifyReply, type FastifyRequest } from 'fastify';
import type { IncomingMessage, ServerResponse } from 'node:http';
import type { RawServerDefault } from 'fastify';
import type { Redis } from 'ioredis';
import type { Logger } from 'pino';
import { redactUrl } from '../../image-access/src/index.js';
import { BootProfileStore } from './boot-profiles.js';
import { type CleaningCreate, type CleaningRecord, CleaningStore, cleaningView, FINISHED, newCleaning } from './cleaning.js';
import { checkConfigDriveField } from './configdrive.js';
import { nodeDevice } from './device.js';
import { ApiError } from '../../openapi/clients/http.js';
import type { Deployment, DeploymentCreate, DeploymentImage, ValidateRequest } from '../../openapi/clients/driver-client.js';
import { type ApiErrorBody, fastifyValidationOptions, loadOpenApi, presentedToken, registerOpenApi, tokenAccepted } from '../../openapi/server.js';
import type { DriverConfig } from './config.js';
import { DRIVER_ERRORS, DriverError } from './errors.js';
import { describeImageRef, parseImageSource, resolveImage } from './image.js';
import { agentClient, agentFor, agentForCleaning } from './jobs.js';
import { probeImage } from './probe.js';
import { QUEUE_NAMES, Queues } from './queues.js';
import type { DriverMetrics } from './metrics.js';
import { ReconcileStore } from './reconcile.js';
import { connectionGeneration } from './redis-connect.js';
import type { RedisFitness } from './redis-fitness.js';
import { type DeploymentRecord, type DeploymentStore, EMPTY_PROGRESS } from './store.js';

export interface DriverApiDeps {
  config: Readonly<DriverConfig>;
  store: DeploymentStore;
  queues: Queues;
  redis: Redis;
  metrics: DriverMetrics;
  log: Logger;
  version: string;
  /** The last reading of Redis's eviction policy and persistence, for /v1/health. */
  fitness?: () => RedisFitness | null;
  /** Where reconcile keeps orphans (default: on `redis`). */
  reconcile?: ReconcileStore;
  /** Node cleanings; default: on `redis` under the config's prefix. */
  cleanings?: CleaningStore;
  /** Boot profiles; default: on `redis` under the config's prefix. */
  profiles?: BootProfileStore;
}

/** The app, typed with the pino logger it was given. */
export type DriverApp = FastifyInstance<RawServerDefault, IncomingMessage, ServerResponse, Logger>;

const SPEC = new URL('../../../openapi/driver.yaml', import.meta.url);
const DASHBOARD = new URL('../../../driver/dashboard/', import.meta.url);

export async function buildDriverApi(deps: DriverApiDeps): Promise<DriverApp> {
  const { config, store, queues } = deps;
  const reconcile = deps.reconcile ?? new ReconcileStore(deps.redis, config.redis.prefix);
  const cleanings = deps.cleanings ?? new CleaningStore(deps.redis, config.redis.prefix);
  const profiles = deps.profiles ?? new BootProfileStore(deps.redis, config.redis.prefix, config.boot_profiles);
  const app = Fastify({ loggerInstance: deps.log, ...fastifyValidationOptions, bodyLimit: 10 << 20 /* an inline config drive: up to 8 MiB */ });

  app.setErrorHandler((err: FastifyError & { field?: string }, req, reply) => {
    if (err.validation) {
      const body: ApiErrorBody = { code: 'DRV_ERR_BAD_REQUEST', message: err.message, retryable: false, ...(err.field ? { field: err.field } : {}) };
      return reply.code(400).send(body);
    }
    if (err instanceof DriverError) {
      if (err.http >= 500) req.log.error({ code: err.code }, err.message);
      const body: ApiErrorBody = { code: err.code, message: err.message, retryable: err.retryable, ...(err.field ? { field: err.field } : {}) };
      return reply.code(err.http).send(body);
    }
    if (isRedisUnavailable(err)) {
      const message = /^NOREPLICAS/.test(err.message)
        ? `Redis refuses writes: fewer replicas are connected than its min-replicas-to-write asks for (${err.message}): retry the request once a replica is back`
        : `Redis is unreachable (${err.message}); the service will answer once it is back`;
      const body: ApiErrorBody = { code: 'DRV_ERR_REDIS', message, retryable: true };
      return reply.code(503).send(body);
    }
    if (err.statusCode && err.statusCode < 500) {
      return reply.code(err.statusCode).send({ code: 'DRV_ERR_BAD_REQUEST', message: err.message, retryable: false } satisfies ApiErrorBody);
    }
    req.log.error({ err }, 'unexpected error');
    return reply.code(500).send({ code: 'DRV_ERR_INTERNAL', message: 'internal error; see the service log', retryable: true } satisfies ApiErrorBody);
  });
  if (config.redis.wait_replicas > 0) {
    // What the API acknowledges must survive a failover: a change is answered only once
    // redis.wait_replicas replicas have it. WAIT covers every write this connection made
    // before it — the request's own included, since every API write goes through it —
    // provided the connection was not made again in between (after a failover it could be
    // to another server, whose replicas never saw the write): the generation says.
    const want = config.redis.wait_replicas;
    const ms = config.redis.wait_timeout_ms;
    const startedOn = new WeakMap<FastifyRequest, number>();
    app.addHook('onRequest', async (req) => {
      if (CHANGING_OPERATIONS.has(operationOf(req))) startedOn.set(req, connectionGeneration(deps.redis));
    });
    app.addHook('onSend', async (req, reply, payload) => {
      const generation = startedOn.get(req);
      if (generation === undefined || reply.statusCode >= 300) return payload;
      let got: number;
      try {
        got = Number(await deps.redis.call('WAIT', want, ms));
      } catch (err) {
        return replaceReply(reply, 503, { code: 'DRV_ERR_REDIS', message: `Redis is unreachable (${(err as Error).message}) while confirming the change reached ${want} replica(s); retry the request once it is back`, retryable: true });
      }
      const reconnected = connectionGeneration(deps.redis) !== generation;
      if (got >= want && !reconnected) return payload;
      const why = reconnected
        ? `the connection to Redis was made again while the change was being confirmed (a failover?), so it may not be on the primary now`
        : `${got} of the ${want} replica(s) redis.wait_replicas asks for confirmed it within ${ms} ms, so a failover now could lose it`;
      const message =
        `${DRIVER_ERRORS.DRV_ERR_REDIS_REPLICATION.message}: ${why}. ` +
        'Retry the request (a deployment or cleaning asked for again is the same one), and see that the replicas are up and replicating (INFO replication on the primary)';
      req.log.warn({ code: 'DRV_ERR_REDIS_REPLICATION', replicas: got, want, reconnected }, message);
      return replaceReply(reply, 503, { code: 'DRV_ERR_REDIS_REPLICATION', message, retryable: true });
    });
  }
  app.setNotFoundHandler((req, reply) => {
    void reply.code(404).send({ code: 'DRV_ERR_NOT_FOUND', message: `no route ${req.method} ${req.url.split('?')[0]}`, retryable: false } satisfies ApiErrorBody);
  });

  const view = async (rec: DeploymentRecord): Promise<Deployment> => ({
    node_uuid: rec.node_uuid,
    deployment_id: rec.deployment_id,
    state: rec.state,
    image_url: rec.image_url,
    image_expires_at: rec.image_expires_at,
    agent_url: rec.agent_url,
    disk_id: rec.disk_id,
    device: nodeDevice(rec.spec),
    export_uri: rec.export_uri,
    progress: rec.progress,
    boot_profile: rec.boot_profile ? { id: rec.boot_profile.id, applied: rec.boot_profile.applied > 0, regions: rec.boot_profile.applied, boots: rec.boot_profile.boots, recording: rec.boot_profile.recording as 'off', collected: rec.boot_profile.collected, note: rec.boot_profile.note } : null,
    peers: rec.peers ? { enabled: rec.peers.key !== null, seeder: rec.peers.seeder ?? false, sources: rec.peers.sources, bytes_from_peers: rec.peers.bytes_from_peers, bytes_served: rec.peers.bytes_served, listed_until: rec.peers.listed_until, note: rec.peers.note } : null,
    last_error: rec.last_error,
    created_at: rec.created_at,
    updated_at: rec.updated_at,
    jobs: await queues.jobsOf(rec),
  });

  const cleaningOf = async (node: string): Promise<CleaningRecord> => {
    const rec = await cleanings.get(node);
    if (!rec) throw new DriverError('DRV_ERR_NOT_FOUND', `node ${node} has no cleaning`);
    return rec;
  };
  const showCleaning = async (rec: CleaningRecord) => cleaningView(rec, await queues.cleanJobs(rec));

  const profileOf = async (req: { params: unknown }) => {
    const id = (req.params as { profile_id: string }).profile_id;
    const p = await profiles.get(id);
    if (!p) throw new DriverError('DRV_ERR_PROFILE_NOT_FOUND', `no boot profile ${id} (GET /v1/boot-profiles lists them)`);
    return p;
  };

  const mustGet = async (node: string): Promise<DeploymentRecord> => {
    const rec = await store.get(node);
    if (!rec) throw new DriverError('DRV_ERR_NOT_FOUND', `node ${node} has no deployment`);
    return rec;
  };

  registerOpenApi(app, loadOpenApi(SPEC), {
    tokens: config.auth.tokens,
    badRequestCode: 'DRV_ERR_BAD_REQUEST',
    unauthorizedCode: 'DRV_ERR_UNAUTHORIZED',
    responseValidation: config.response_validation,
    handlers: {
      async getHealth(_req, reply) {
        const up = await deps.redis.ping().then(
          () => true,
          () => false,
        );
        const f = deps.fitness?.() ?? null;
        const fitness = deps.fitness ? { redis_persistence: f?.persistence ?? 'unknown', redis_maxmemory_policy: f?.maxmemory_policy ?? 'unknown', redis_replicas: f?.replicas ?? null } : {};
        return reply.code(up ? 200 : 503).send({ status: up ? 'ok' : 'degraded', version: deps.version, redis: up ? 'up' : 'down', ...fitness });
      },
      async listBootProfiles() {
        return { profiles: await profiles.list() };
      },
      async getBootProfile(req) {
        return profileOf(req);
      },
      async deleteBootProfile(req) {
        const p = await profileOf(req);
        await profiles.delete(p.id);
        deps.log.info({ profile: p.id, key: p.key, boots: p.boots }, 'boot profile deleted');
        return p;
      },
      async listOrphans() {
        const [orphans, scans, last] = await Promise.all([reconcile.orphans(), reconcile.scans(), reconcile.last()]);
        const { grace_ms, remove_orphans } = config.reconcile;
        return {
          orphans: orphans.map((o) => ({
            agent_url: o.agent_url,
            disk_id: o.disk_id,
            state: o.state,
            size: o.size,
            target: o.target,
            first_seen_at: o.first_seen_at,
            last_seen_at: o.last_seen_at,
            remove_after: remove_orphans ? new Date(Date.parse(o.first_seen_at) + grace_ms).toISOString() : null,
            last_error: o.last_error,
          })),
          agents: scans,
          reconciled_at: last?.finished_at ?? null,
          removal_held: last?.removal_held ?? null,
        };
      },
      async getMetrics(_req, reply) {
        return reply.type(deps.metrics.registry.contentType).send(await deps.metrics.registry.metrics());
      },
      async validate(req) {
        const body = req.body as ValidateRequest;
        checkConfigDriveField(body.instance_info.configdrive);
        const image = await resolveImage(body.instance_info, config);
        const agent = agentClient(config, body.driver_info.smartnic_agent_url, body.driver_info.smartnic_agent_token);
        await agent.health().catch((err: Error) => {
          throw new DriverError('DRV_ERR_INVALID', `driver_info.smartnic_agent_url ${body.driver_info.smartnic_agent_url} does not answer: ${err.message}`, { field: 'driver_info.smartnic_agent_url' });
        });
        const size = await probeImage(image.url, config.glance.timeout_ms, image.headers);
        if (image.size !== undefined && size !== image.size) {
          throw new DriverError('DRV_ERR_IMAGE_SOURCE', `${redactUrl(image.url)} serves ${size} bytes, but the image is ${image.size}`, { field: 'instance_info.image_source' });
        }
        // A qcow2's disk is its virtual size, which the agent learns when it opens it.
        if (image.format === 'raw') checkRootDisk(body.instance_info.root_gb, size);
        return { valid: true, image_size: size };
      },
      async listDeployments() {
        return { deployments: await Promise.all((await store.list()).map(view)) };
      },
      async createDeployment(req, reply) {
        const body = req.body as DeploymentCreate;
        // A malformed source or config drive is refused now; Glance, Swift and a config
        // drive's URL are asked by the attach job.
        const image = parseImageSource(body.instance_info, config);
        checkConfigDriveField(body.instance_info.configdrive);
        const deploymentId = body.deployment_id ?? derivedId(body);
        const cleaning = await cleanings.get(body.node_uuid);
        if (cleaning && !FINISHED.includes(cleaning.state)) {
          throw new DriverError('DRV_ERR_CONFLICT', `node ${body.node_uuid} is being cleaned (${cleaning.step}, ${cleaning.state}): its DPU target is being erased; deploy once the cleaning has ended`);
        }
        const now = new Date().toISOString();
        const rec: DeploymentRecord = {
          node_uuid: body.node_uuid,
          deployment_id: deploymentId,
          state: 'attaching',
          image_url: describeImageRef(image),
          image_expires_at: null,
          agent_url: body.driver_info.smartnic_agent_url.replace(/\/+$/, ''),
          disk_id: diskId(body.node_uuid, deploymentId),
          export_uri: null,
          progress: EMPTY_PROGRESS,
          last_error: null,
          created_at: now,
          updated_at: now,
          spec: { ...body, deployment_id: deploymentId },
        };
        const existing = await store.createIfAbsent(rec);
        if (existing && existing.deployment_id !== deploymentId) {
          throw new DriverError('DRV_ERR_CONFLICT', `node ${body.node_uuid} has deployment ${existing.deployment_id} (${existing.state}); DELETE /v1/deployments/${body.node_uuid} first`);
        }
        const current = existing ?? rec;
        // Enqueue even for a duplicate: if the first request died between the record and
        // the job, this repairs it; if the job exists, BullMQ keeps the one it has.
        if (current.state === 'attaching') await queues.enqueue('attach', current);
        req.log.info({ node: current.node_uuid, deployment: current.deployment_id, image: current.image_url, duplicate: !!existing }, 'deployment requested');
        return reply.code(existing ? 200 : 202).send(await view(current));
      },
      async replaceDeploymentImage(req) {
        const { node_uuid } = req.params as { node_uuid: string };
        const body = req.body as DeploymentImage;
        const rec = await mustGet(node_uuid);
        if (rec.deployment_id !== body.deployment_id) {
          throw new DriverError('DRV_ERR_CONFLICT', `node ${node_uuid} has deployment ${rec.deployment_id}, not ${body.deployment_id}`);
        }
        if (rec.state === 'deleting' || rec.state === 'failed') throw new DriverError('DRV_ERR_CONFLICT', `the deployment of node ${node_uuid} is ${rec.state}`);
        const info = { ...rec.spec.instance_info, ...body.instance_info };
        // Only a URL of the same content may replace the current one: both must name it by
        // their digest (resolving an http source asks nothing of the network).
        const [now, next] = await Promise.all([resolveImage(rec.spec.instance_info, config), resolveImage(info, config)]);
        if (!next.identity || next.identity !== now.identity) {
          throw new DriverError('DRV_ERR_INVALID', `the new image (${next.identity ?? 'no digest'}) is not the deployment's (${now.identity ?? 'no digest'}): only a new URL of the same image, with the same digest, can replace it`, {
            field: 'instance_info.image_source',
          });
        }
        // A streaming disk switches now; an attach that is running may still create the disk
        // with the old URL, which then still has the caller's renewal margin to live.
        if (rec.state === 'ready') {
          await agentFor(rec, config)
            .updateSource(rec.disk_id, { url: next.url, ...(next.headers && Object.keys(next.headers).length ? { headers: next.headers } : {}), identity: next.identity })
            .catch((err: unknown) => {
              if (err instanceof ApiError && err.status === 404) return null; // not created yet, or gone: the spec below is what counts
              throw new DriverError(err instanceof ApiError && err.status !== null ? 'DRV_ERR_AGENT_REJECTED' : 'DRV_ERR_AGENT_UNREACHABLE', `replacing the source URL of disk ${rec.disk_id} on ${rec.agent_url}: ${(err as Error).message}`, { cause: err });
            });
        }
        const image_url = redactUrl(next.url);
        await store.update(rec.node_uuid, rec.deployment_id, { spec: { ...rec.spec, instance_info: info }, ...(rec.state === 'attaching' ? {} : { image_url }) });
        req.log.info({ node: node_uuid, deployment: rec.deployment_id, image: image_url, state: rec.state }, 'image URL replaced');
        return view((await store.get(node_uuid)) ?? rec);
      },
      async getDeploymentRegions(req) {
        const rec = await mustGet((req.params as { node_uuid: string }).node_uuid);
        try {
          return await agentFor(rec, config).regionMap(rec.disk_id);
        } catch (err) {
          if (err instanceof ApiError && err.status === 404) throw new DriverError('DRV_ERR_NOT_FOUND', `the DPU agent has no disk for node ${rec.node_uuid} yet (deployment ${rec.state})`);
          throw new DriverError('DRV_ERR_AGENT_UNREACHABLE', `region map of ${rec.disk_id} from ${rec.agent_url}: ${(err as Error).message}`);
        }
      },
      async getCleaning(req) {
        return showCleaning(await cleaningOf((req.params as { node_uuid: string }).node_uuid));
      },
      async createCleaning(req, reply) {
        const { node_uuid } = req.params as { node_uuid: string };
        const body = req.body as CleaningCreate;
        const deployment = await store.get(node_uuid);
        if (deployment) {
          throw new DriverError('DRV_ERR_CONFLICT', `node ${node_uuid} has deployment ${deployment.deployment_id} (${deployment.state}), whose disk uses the DPU target; DELETE /v1/deployments/${node_uuid} before cleaning`);
        }
        const rec = newCleaning(node_uuid, body);
        const existing = await cleanings.createIfIdle(rec);
        if (existing && (existing.step !== rec.step || existing.target !== rec.target || existing.agent_url !== rec.agent_url)) {
          throw new DriverError('DRV_ERR_CONFLICT', `node ${node_uuid} has a cleaning ${existing.state} (${existing.step} of ${existing.target}); wait for it to end or DELETE /v1/nodes/${node_uuid}/cleaning`);
        }
        const current = existing ?? rec;
        // Enqueue for a duplicate too: it repairs a request that died between the record and
        // the job; BullMQ keeps the job it has.
        await queues.enqueueClean(current);
        req.log.info({ node: node_uuid, cleaning: current.cleaning_id, step: current.step, target: current.target, duplicate: !!existing }, 'cleaning requested');
        return reply.code(existing ? 200 : 202).send(await showCleaning(current));
      },
      async cancelCleaning(req) {
        const { node_uuid } = req.params as { node_uuid: string };
        const rec = await cleaningOf(node_uuid);
        if (FINISHED.includes(rec.state)) return showCleaning(rec);
        await cleanings.update(node_uuid, rec.cleaning_id, { state: 'cancelled', last_error: 'cancelled by DELETE /v1/nodes/{node}/cleaning', finished_at: new Date().toISOString() });
        // The job stops at its next run; the erasure it started is stopped here (a job that
        // is just starting one stops it itself, finding the cleaning cancelled).
        if (rec.erasure_id) {
          await agentForCleaning(rec, config)
            .cancelErasure(rec.erasure_id)
            .catch((err: Error) => req.log.warn({ node: node_uuid, erasure: rec.erasure_id, err: err.message }, 'could not cancel the erasure on the agent; it may run to its end'));
        }
        const job = await queues.byName.clean.getJob(Queues.cleanJobId(rec));
        if (job && ['waiting', 'delayed', 'prioritized'].includes(await job.getState())) await job.remove().catch(() => undefined);
        req.log.info({ node: node_uuid, cleaning: rec.cleaning_id }, 'cleaning cancelled');
        return showCleaning((await cleanings.get(node_uuid)) ?? rec);
      },
      async getDeployment(req) {
        return view(await mustGet((req.params as { node_uuid: string }).node_uuid));
      },
      async deleteDeployment(req, reply) {
        const { node_uuid } = req.params as { node_uuid: string };
        const { wipe = true } = req.query as { wipe?: boolean };
        const rec = await mustGet(node_uuid);
        await store.update(rec.node_uuid, rec.deployment_id, { state: 'deleting', last_error: null }, { teardown: true });
        // A teardown that failed before (agent unreachable past its attempts) keeps its job
        // id: retry that job, since adding it again would be ignored as a duplicate.
        const previous = await queues.job('teardown', rec);
        if (previous && (await previous.getState()) === 'failed') await previous.retry();
        else await queues.enqueue('teardown', rec, { wipe });
        req.log.info({ node: node_uuid, deployment: rec.deployment_id, wipe }, 'teardown requested');
        return reply.code(202).send(await view({ ...rec, state: 'deleting' }));
      },
    },
  });

  // The dashboard's page and script hold no data (they call the API with the token the
  // user gives), so they are served without authentication.
  for (const [url, file, type] of [
    ['/dashboard/', 'index.html', 'text/html; charset=utf-8'],
    ['/dashboard/app.js', 'app.js', 'text/javascript; charset=utf-8'],
  ] as const) {
    const body = fs.readFileSync(new URL(file, DASHBOARD));
    app.get(url, (_req, reply) => reply.type(type).header('cache-control', 'no-cache').send(body));
  }
  app.get('/dashboard', (_req, reply) => reply.redirect('/dashboard/'));
  app.get('/', (_req, reply) => reply.redirect('/dashboard/'));

  const boardTokens = config.auth.tokens.map((t) => Buffer.from(t));
  if (config.bull_board.enabled) {
    const adapter = new FastifyAdapter();
    createBullBoard({ queues: QUEUE_NAMES.map((q) => new BullMQAdapter(queues.byName[q])), serverAdapter: adapter });
    adapter.setBasePath(config.bull_board.path);
    await app.register(async (scope) => {
      // Browsers cannot send a bearer token: the UI takes HTTP Basic auth with the token as
      // password (any user name), or the bearer header for scripts.
      if (boardTokens.length) scope.addHook('onRequest', (req, reply, done) => boardAuth(req, reply, done, boardTokens));
      await scope.register(adapter.registerPlugin(), { prefix: config.bull_board.path });
    });
  }
  return app;
}

/** The operations that change what Redis holds: their answers wait for redis.wait_replicas. */
const CHANGING_OPERATIONS: ReadonlySet<string> = new Set(['createDeployment', 'deleteDeployment', 'replaceDeploymentImage', 'createCleaning', 'cancelCleaning', 'deleteBootProfile']);

function operationOf(req: FastifyRequest): string {
  return ((req.routeOptions.config as { operationId?: string } | undefined)?.operationId) ?? '';
}

/** In onSend: answer `status` with `body` instead of what the handler sent. */
function replaceReply(reply: FastifyReply, status: number, body: ApiErrorBody): string {
  void reply.code(status).header('content-type', 'application/json; charset=utf-8');
  return JSON.stringify(body);
}

/** Ironic's check_image_size: the root disk must hold the image. */
function checkRootDisk(rootGb: number | undefined, imageSize: number): void {
  if (!rootGb) return;
  if (rootGb * GiB < imageSize) {
    throw new DriverError('DRV_ERR_INVALID', `instance_info.root_gb is ${rootGb} GiB, but the image is ${(imageSize / GiB).toFixed(2)} GiB: give the node a root disk at least as large as the image`, { field: 'instance_info.root_gb' });
  }
}

const GiB = 2 ** 30;

/** ioredis's errors when the (fail-fast) API connection cannot reach Redis. */
function isRedisUnavailable(err: Error): boolean {
  return err.name === 'MaxRetriesPerRequestError' || /Connection is closed|enableOfflineQueue|ECONNREFUSED|ETIMEDOUT|Command timed out|^READONLY|^NOREPLICAS|sentinels are unreachable/.test(err.message);
}

/** Without a deployment_id, the same request body always means the same deployment. */
function derivedId(body: DeploymentCreate): string {
  const h = createHash('sha256').update(JSON.stringify([body.node_uuid, body.instance_info, body.driver_info])).digest('hex');
  return `d-${h.slice(0, 16)}`;
}

/**
 * The agent's disk id: lower-case, safe characters, bounded (openapi/dpu-agent.yaml DiskId).
 * reconcile.disk_id_pattern's default matches every id this makes.
 */
export function diskId(node: string, deployment: string): string {
  return `${node}-${deployment}`.toLowerCase().replace(/[^a-z0-9._-]/g, '-').slice(0, 128);
}

function boardAuth(req: FastifyRequest, reply: FastifyReply, done: (err?: Error) => void, tokens: readonly Buffer[]): void {
  if (tokenAccepted(presentedToken(req.headers.authorization), tokens)) return done();
  void reply
    .code(401)
    .header('www-authenticate', 'Basic realm="smartnic-driver", charset="UTF-8"')
    .send({ code: 'DRV_ERR_UNAUTHORIZED', message: 'this page needs the API token (as Basic-auth password, any user name, or as a bearer token)', retryable: false } satisfies ApiErrorBody);
}

/**
 * The management API (openapi/dpu-agent.yaml): built here, listened on by serve.ts, so
 * tests build it in-process with their own manager and logger.
 *
 * Routes, validation and bearer authentication come from the YAML (openapi/server.ts);
 * this file holds the handlers and the one error mapping: a DpuError answers with its
 * registry status and code, a validation failure with 400 DPU_ERR_BAD_REQUEST naming the
 * field, anything else with 500 DPU_ERR_INTERNAL. Every error body is the `Error` schema.
 */
import fs from 'node:fs';
import type { ServerOptions as HttpsServerOptions } from 'node:https';
import Fastify, { type FastifyBaseLogger, type FastifyError, type FastifyInstance, type FastifyRequest, LogController, type RouteHandlerMethod } from 'fastify';
import type { Logger } from 'pino';
import type { TlsPair } from '../../../common/src/tls.js';
import { type ApiErrorBody, fastifyValidationOptions, loadOpenApi, registerOpenApi } from '../../../openapi/server.js';
import { DpuError } from '../../../image-access/src/errors.js';
import { type AgentConfig, resolveTokens } from './config.js';
import type { DiskCreate, DiskManager, HydrationUpdate, PeerList, SourceUpdate } from './disks.js';
import type { ErasureCreate } from './erasures.js';
import { createMetrics } from './metrics.js';
import { SendPacer } from './send-pacer.js';

// From dist/dpu-agent/src/daemon/api.js (and from the sources) back to the repository root.
const SPEC_URL = new URL('../../../../openapi/dpu-agent.yaml', import.meta.url);
const PACKAGE_URL = new URL('../../../../dpu-agent/package.json', import.meta.url);

/**
 * The largest manifest body accepted (PUT /v1/disks/{id}/manifest): 32 bytes a region,
 * so 64 MiB covers 2 Mi regions — a 2 TiB image in 1 MiB regions. A larger body gets 413.
 */
export const MAX_MANIFEST_BYTES = 64 << 20;

/** Request headers that carry credentials: censored wherever a request is logged. */
export const REDACT_PATHS = ['req.headers.authorization', 'req.headers["x-auth-token"]', 'headers.authorization', 'headers["x-auth-token"]'];

export interface AgentApiDeps {
  config: Readonly<AgentConfig>;
  manager: DiskManager;
  log: Logger;
  /** Check every JSON response against the YAML; 'strict' turns a mismatch into a 500. @default 'off' */
  responseValidation?: 'off' | 'log' | 'strict';
  /** Serve HTTPS with this certificate and key (config listen.tls, read by agentApiTls). @default plain HTTP */
  tls?: TlsPair;
}

export function buildAgentApi(deps: AgentApiDeps): FastifyInstance {
  const { config, manager } = deps;
  const log = deps.log.child({ component: 'api' }, { redact: { paths: REDACT_PATHS, censor: 'REDACTED' } });
  const https: HttpsServerOptions | undefined = deps.tls ? { cert: deps.tls.cert, key: deps.tls.key, minVersion: 'TLSv1.2' } : undefined;
  const app = Fastify({
    // Typed as fastify's logger so the instance is the plain FastifyInstance that
    // registerOpenApi and the tests take; it is the pino child all the same.
    loggerInstance: log as FastifyBaseLogger,
    // One line per request, from the onResponse hook below, instead of fastify's two.
    logController: new LogController({ disableRequestLogging: true }),
    ...fastifyValidationOptions,
    // Typed as an HTTP server's instance (what the routes and hooks here use) either way.
    ...((https ? { https } : {}) as object),
  }) as FastifyInstance;
  const metrics = createMetrics(manager);
  const { serve_bandwidth: rate, host_yield_ms: holdMs } = config.peers;
  const pacer = rate > 0 || holdMs > 0 ? new SendPacer({ rate, host: manager.hostActivity, holdMs }) : null;
  const version = (JSON.parse(fs.readFileSync(PACKAGE_URL, 'utf8')) as { version: string }).version;
  const idOf = (req: { params: unknown }): string => (req.params as { id: string }).id;
  const erasureIdOf = (req: { params: unknown }): string => (req.params as { erasure_id: string }).erasure_id;

  const handlers: Record<string, RouteHandlerMethod> = {
    getHealth: async () => ({ status: 'ok', version, disks: manager.count }),
    getMetrics: async (_req, reply) => reply.type(metrics.contentType).send(await metrics.render()),
    listDisks: async () => ({ disks: manager.list() }),
    createDisk: async (req, reply) => {
      const { disk, created } = await manager.create(req.body as DiskCreate);
      return reply.code(created ? 201 : 200).send(disk);
    },
    getDisk: async (req) => manager.get(idOf(req)),
    deleteDisk: async (req) => manager.delete(idOf(req), (req.query as { wipe?: boolean }).wipe === true),
    getRegionMap: async (req) => manager.regionMap(idOf(req)),
    getBootProfile: async (req) => manager.bootProfile(idOf(req)),
    setPeers: async (req) => manager.setPeers(idOf(req), req.body as PeerList),
    getDiskImage: async (req, reply) => {
      const { data, start, end, size, release, sent } = await manager.readForPeer(idOf(req), req.headers.authorization, req.headers.range);
      // The slot (peers.max_inflight) is held until the answer is sent or the peer is gone:
      // a peer that stops reading cannot pin more buffers than that.
      reply.raw.once('close', release);
      // Served once the whole answer has gone out; not for a peer gone before.
      reply.raw.once('finish', sent);
      // A peer gone while this read waited for its slot or the target: its 'close' has
      // passed already, and would never release the slot.
      if (reply.raw.destroyed || req.raw.socket?.destroyed) release();
      reply.code(206).type('application/octet-stream').header('content-range', `bytes ${start}-${end}/${size}`);
      // In pieces that yield to the host and keep to peers.serve_bandwidth, with the length said up front.
      return pacer ? reply.header('content-length', data.length).send(pacer.stream(data)) : reply.send(data);
    },
    getDiskImageRegions: async (req) => manager.peerRegions(idOf(req), req.headers.authorization),
    updateHydration: async (req) => manager.setHydration(idOf(req), req.body as HydrationUpdate),
    updateSource: async (req) => manager.setSource(idOf(req), req.body as SourceUpdate),
    setManifest: async (req) => {
      if (!Buffer.isBuffer(req.body)) throw new DpuError('DPU_ERR_BAD_REQUEST', 'the manifest is a binary body with Content-Type: application/octet-stream (see `dpu-agent manifest`)');
      return manager.setManifest(idOf(req), req.body);
    },
    listErasures: async () => ({ erasures: manager.erasures.list() }),
    createErasure: async (req, reply) => {
      const { erasure, created } = manager.erasures.create(req.body as ErasureCreate);
      return reply.code(created ? 202 : 200).send(erasure);
    },
    getErasure: async (req) => manager.erasures.get(erasureIdOf(req)),
    cancelErasure: async (req) => manager.erasures.cancel(erasureIdOf(req)),
    setConfigDrive: async (req) => {
      if (!Buffer.isBuffer(req.body)) throw new DpuError('DPU_ERR_BAD_REQUEST', 'the config drive is a binary body (the ISO itself, not encoded) with Content-Type: application/octet-stream', { field: 'body' });
      return manager.setConfigDrive(idOf(req), req.body);
    },
  };
  // The binary request bodies (a manifest, a config drive): read whole, up to 64 MiB, as a Buffer.
  app.addContentTypeParser('application/octet-stream', { parseAs: 'buffer', bodyLimit: MAX_MANIFEST_BYTES }, (_req, body, done) => done(null, body));
  registerOpenApi(app, loadOpenApi(SPEC_URL), {
    handlers,
    tokens: config.auth.disabled ? [] : resolveTokens(config),
    badRequestCode: 'DPU_ERR_BAD_REQUEST',
    unauthorizedCode: 'DPU_ERR_UNAUTHORIZED',
    responseValidation: deps.responseValidation ?? 'off',
  });

  // Requests refused as flow control (DPU_ERR_BUSY: a peer read when the serving slots and
  // their queue are full): the peer asks another, so the refusal is not a failure. A fleet's
  // seeder refuses many a second; as errors with their stacks they cost it CPU and buried
  // its real errors.
  const busy = new WeakSet<FastifyRequest>();
  app.setErrorHandler((err: FastifyError, req, reply) => {
    const { status, body } = errorReply(err);
    if (body.code === 'DPU_ERR_BUSY') {
      busy.add(req);
      req.log.debug({ code: body.code, detail: body.message }, 'request refused: busy');
    } else if (status >= 500) req.log.error({ err, code: body.code }, 'request failed');
    else req.log.info({ code: body.code, field: body.field, detail: body.message }, 'request refused');
    void reply.code(status).send(body);
  });
  app.setNotFoundHandler((req, reply) => {
    const body: ApiErrorBody = { code: 'DPU_ERR_NOT_FOUND', message: `no endpoint ${req.method} ${req.url.split('?')[0]}; see openapi/dpu-agent.yaml`, retryable: false };
    void reply.code(404).send(body);
  });
  app.addHook('onResponse', (req, reply, done) => {
    const status = reply.statusCode;
    const level = busy.has(req) && status === 503 ? 'debug' : status >= 500 ? 'error' : req.method === 'GET' && status < 400 ? 'debug' : 'info';
    req.log[level]({ method: req.method, url: req.url, status, ms: Math.round(reply.elapsedTime) }, 'request');
    done();
  });
  return app;
}

/** The one mapping from a failure to the API's status and Error body. */
export function errorReply(err: unknown): { status: number; body: ApiErrorBody } {
  let e: DpuError;
  if (err instanceof DpuError) e = err;
  else {
    const fe = err as FastifyError & { field?: string };
    if (fe.validation || (typeof fe.statusCode === 'number' && fe.statusCode >= 400 && fe.statusCode < 500)) {
      // Validation errors (their message names the field) and body-parser refusals.
      const out = new DpuError('DPU_ERR_BAD_REQUEST', fe.message, fe.field !== undefined ? { field: fe.field } : undefined);
      return { status: fe.validation ? 400 : fe.statusCode!, body: bodyOf(out) };
    }
    e = new DpuError('DPU_ERR_INTERNAL', fe?.message ?? String(err), { cause: err });
  }
  return { status: e.http, body: bodyOf(e) };
}

function bodyOf(e: DpuError): ApiErrorBody {
  return { code: e.code, message: e.message, retryable: e.retryable, ...(e.field !== undefined ? { field: e.field } : {}) };
}

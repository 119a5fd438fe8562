/**
 * Builds fastify routes from an OpenAPI 3.1 document, so the document is the one source of
 * truth for both services: request bodies, path and query parameters are validated
 * against it (unknown fields refused, not dropped), responses are serialized with — and,
 * where asked, checked against — its response schemas, and every operation with a
 * security requirement gets bearer-token authentication.
 *
 * A handler is registered per operationId; an operation without a handler is an error at
 * start-up, so the document and the code cannot drift apart silently.
 */
import { timingSafeEqual } from 'node:crypto';
import fs from 'node:fs';
import { Ajv, type ErrorObject, type ValidateFunction } from 'ajv';
import addFormatsModule from 'ajv-formats';
import type { FastifyInstance, FastifyReply, FastifyRequest, RouteHandlerMethod } from 'fastify';
import { parse as parseYaml } from 'yaml';

// ajv-formats is CommonJS with a default export.
const addFormats = addFormatsModule as unknown as (ajv: Ajv) => Ajv;

type Json = null | boolean | number | string | Json[] | { [k: string]: Json };
type JsonObject = { [k: string]: Json };

export interface OpenApiDocument {
  openapi: string;
  info: { title: string; version: string };
  paths: Record<string, Record<string, JsonObject>>;
  components?: JsonObject;
  security?: Json[];
}

const METHODS = ['get', 'post', 'put', 'patch', 'delete'] as const;

export function loadOpenApi(file: string | URL): OpenApiDocument {
  return parseYaml(fs.readFileSync(file, 'utf8')) as OpenApiDocument;
}

/** Replaces internal `$ref`s with the objects they point at (the documents have no cycles). */
export function deref(doc: OpenApiDocument, node: Json, depth = 0): Json {
  if (depth > 64) throw new Error('OpenAPI $ref nesting too deep (a cycle?)');
  if (Array.isArray(node)) return node.map((n) => deref(doc, n, depth + 1));
  if (node === null || typeof node !== 'object') return node;
  const ref = node['$ref'];
  if (typeof ref === 'string') {
    if (!ref.startsWith('#/')) throw new Error(`only internal $refs are supported: ${ref}`);
    let target: Json = doc as unknown as Json;
    for (const part of ref.slice(2).split('/')) target = (target as JsonObject)[part]!;
    if (target === undefined) throw new Error(`unresolved $ref ${ref}`);
    return deref(doc, target, depth + 1);
  }
  const out: JsonObject = {};
  for (const [k, v] of Object.entries(node)) out[k] = deref(doc, v, depth + 1);
  return out;
}

export interface ApiErrorBody {
  code: string;
  message: string;
  retryable: boolean;
  field?: string;
}

export interface RouteOptions {
  /** Handlers by operationId. */
  handlers: Record<string, RouteHandlerMethod>;
  /** Bearer tokens accepted; empty means authentication is off (tests and labs only). */
  tokens: string[];
  /** Error code for malformed requests, e.g. DPU_ERR_BAD_REQUEST. */
  badRequestCode: string;
  /** Error code for a missing or wrong token. */
  unauthorizedCode: string;
  /** Check every JSON response against its schema; 'strict' turns a mismatch into a 500. @default 'off' */
  responseValidation?: 'off' | 'log' | 'strict';
}

/** Registers every operation of `doc` on `app`. */
// Any logger type: the services pass their own pino root as fastify's loggerInstance.
// eslint-disable-next-line @typescript-eslint/no-explicit-any
export function registerOpenApi(app: FastifyInstance<any, any, any, any>, doc: OpenApiDocument, opts: RouteOptions): void {
  const tokens = opts.tokens.map((t) => Buffer.from(t));
  const ajv = new Ajv({ allErrors: false, strict: false, coerceTypes: false });
  addFormats(ajv);
  // Bodies are JSON and must arrive with the right types; path and query parameters are
  // strings on the wire and are coerced ("true" → true, "8" → 8).
  const bodyAjv = new Ajv({ allErrors: false, strict: false, coerceTypes: false, removeAdditional: false, useDefaults: true });
  const paramAjv = new Ajv({ allErrors: false, strict: false, coerceTypes: true, removeAdditional: false, useDefaults: true });
  addFormats(bodyAjv);
  addFormats(paramAjv);
  app.setValidatorCompiler(({ schema, httpPart }) => (httpPart === 'body' ? bodyAjv : paramAjv).compile(schema as object) as never);
  const used = new Set<string>();
  for (const [path, item] of Object.entries(doc.paths)) {
    const shared = (item['parameters'] as unknown as Json[] | undefined) ?? [];
    for (const method of METHODS) {
      const op = item[method];
      if (!op) continue;
      const operationId = op['operationId'] as string;
      const handler = opts.handlers[operationId];
      if (!handler) throw new Error(`no handler for operation ${operationId} (${method.toUpperCase()} ${path})`);
      used.add(operationId);
      const params = [...shared, ...((op['parameters'] as Json[] | undefined) ?? [])].map((p) => deref(doc, p) as JsonObject);
      const schema: Record<string, Json> = {};
      const pathParams = params.filter((p) => p['in'] === 'path');
      const queryParams = params.filter((p) => p['in'] === 'query');
      if (pathParams.length) schema['params'] = objectOf(pathParams);
      if (queryParams.length) schema['querystring'] = { ...objectOf(queryParams), additionalProperties: false };
      const body = (deref(doc, op['requestBody'] ?? null) as JsonObject | null)?.['content'] as JsonObject | undefined;
      const bodySchema = (body?.['application/json'] as JsonObject | undefined)?.['schema'];
      if (bodySchema) schema['body'] = bodySchema;
      const responses: Record<string, Json> = {};
      const checkers = new Map<number, ValidateFunction>();
      for (const [status, resp] of Object.entries((op['responses'] as JsonObject) ?? {})) {
        const r = deref(doc, resp) as JsonObject;
        const json = ((r['content'] as JsonObject | undefined)?.['application/json'] as JsonObject | undefined)?.['schema'];
        if (json) {
          responses[status] = json;
          if (opts.responseValidation && opts.responseValidation !== 'off') checkers.set(Number(status), ajv.compile(json as object));
        }
      }
      if (Object.keys(responses).length) schema['response'] = responses;
      const security = (op['security'] as Json[] | undefined) ?? doc.security ?? [];
      const secured = security.length > 0 && tokens.length > 0;
      app.route({
        method: method.toUpperCase() as 'GET',
        url: path.replace(/\{([^}]+)\}/g, ':$1'),
        schema: schema as never,
        config: { operationId },
        ...(secured ? { onRequest: (req: FastifyRequest, reply: FastifyReply, done: (err?: Error) => void) => authenticate(req, reply, done, tokens, opts.unauthorizedCode) } : {}),
        ...(checkers.size
          ? {
              preSerialization: (req: FastifyRequest, reply: FastifyReply, payload: unknown, done: (err: Error | null, p?: unknown) => void) => {
                const check = checkers.get(reply.statusCode);
                if (check && !check(payload)) {
                  const msg = `response ${reply.statusCode} of ${operationId} does not match the OpenAPI schema: ${formatAjvErrors(check.errors ?? [], 'response')}`;
                  req.log.error(msg);
                  if (opts.responseValidation === 'strict') return done(new Error(msg));
                }
                done(null, payload);
              },
            }
          : {}),
        handler,
      });
    }
  }
  const unused = Object.keys(opts.handlers).filter((h) => !used.has(h));
  if (unused.length) throw new Error(`handlers for operations not in ${doc.info.title}: ${unused.join(', ')}`);
}

function objectOf(params: JsonObject[]): JsonObject {
  const properties: JsonObject = {};
  const required: string[] = [];
  for (const p of params) {
    properties[p['name'] as string] = p['schema'] ?? {};
    if (p['required']) required.push(p['name'] as string);
  }
  return { type: 'object', properties, required };
}

function authenticate(req: FastifyRequest, reply: FastifyReply, done: (err?: Error) => void, tokens: Buffer[], code: string): void {
  const given = presentedToken(req.headers.authorization);
  if (tokenAccepted(given, tokens)) return done();
  const body: ApiErrorBody = {
    code,
    message: given ? 'the bearer token is not accepted' : 'this endpoint needs "Authorization: Bearer <token>"',
    retryable: false,
  };
  void reply.code(401).header('www-authenticate', 'Bearer').send(body);
}

/**
 * The token a request presents: a bearer token, or the password of HTTP Basic auth (any
 * user name) — what a browser can send for the dashboard and bull-board.
 */
export function presentedToken(header: string | undefined): Buffer | null {
  const h = header ?? '';
  const bearer = /^Bearer (.+)$/i.exec(h);
  if (bearer) return Buffer.from(bearer[1]!.trim());
  const basic = /^Basic (.+)$/i.exec(h);
  if (basic) {
    const decoded = Buffer.from(basic[1]!.trim(), 'base64').toString('utf8');
    const colon = decoded.indexOf(':');
    return colon >= 0 ? Buffer.from(decoded.slice(colon + 1)) : null;
  }
  return null;
}

/** Constant-time membership of `given` in `tokens` (no early exit, no hint which matched). */
export function tokenAccepted(given: Buffer | null, tokens: readonly Buffer[]): boolean {
  let ok = false;
  if (given) for (const t of tokens) if (t.length === given.length && timingSafeEqual(t, given)) ok = true;
  return ok;
}

/** ajv errors as one sentence that names each field, e.g. `body.source.url must match pattern "^https?://"`. */
export function formatAjvErrors(errors: readonly Partial<ErrorObject>[], root: string): string {
  return errors
    .map((e) => {
      const at = `${root}${(e.instancePath ?? '').replace(/\//g, '.')}`;
      const p = (e.params ?? {}) as Record<string, unknown>;
      if (e.keyword === 'additionalProperties') return `${at} has an unknown field "${String(p['additionalProperty'])}"`;
      if (e.keyword === 'required') return `${at} is missing the required field "${String(p['missingProperty'])}"`;
      if (e.keyword === 'enum') return `${at} must be one of ${(p['allowedValues'] as unknown[]).map((v) => JSON.stringify(v)).join(', ')}`;
      return `${at} ${e.message ?? 'is invalid'}`;
    })
    .join('; ');
}

/** The field an ajv error blames, as a dotted path without the root (for `Error.field`). */
export function blamedField(e: Partial<ErrorObject>): string {
  const p = (e.params ?? {}) as Record<string, unknown>;
  const extra = e.keyword === 'required' ? p['missingProperty'] : e.keyword === 'additionalProperties' ? p['additionalProperty'] : undefined;
  const parts = (e.instancePath ?? '').split('/').filter(Boolean);
  if (extra) parts.push(String(extra));
  return parts.join('.');
}

/** The fastify options both services use: validation errors that name the field. */
export const fastifyValidationOptions = {
  schemaErrorFormatter: (errors: ErrorObject[], dataVar: string): Error => {
    const err = new Error(formatAjvErrors(errors, dataVar)) as Error & { field?: string };
    if (errors[0]) err.field = blamedField(errors[0]);
    return err;
  },
  // fastify's default (100) is shorter than a DiskId may be (128): a longer path
  // parameter is checked by its schema, which names it, instead of a bare 414.
  routerOptions: { maxParamLength: 256 },
  // A URL the router cannot decode, or a parameter over that bound, goes through the
  // service's error handler too, so it answers with an Error body like every refusal.
  // (the service's handler, looked up per request: the router's context predates it)
  frameworkErrors: (err: Error, req: FastifyRequest, reply: FastifyReply): void => void req.server.errorHandler(err as never, req, reply),
} as const;

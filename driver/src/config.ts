/** The driver service's configuration, declared once (see common/src/config.ts). */
import fs from 'node:fs';
import { ConfigError, type ConfigSchema, loadConfigFile, validateConfig } from '../../common/src/config.js';

export interface DriverConfig {
  listen: { host: string; port: number };
  auth: { tokens: string[]; token_file?: string; disabled: boolean };
  redis: { url: string; prefix: string };
  agent: { token?: string; timeout_ms: number };
  jobs: {
    attach_attempts: number;
    teardown_attempts: number;
    backoff_ms: number;
    export_timeout_ms: number;
    monitor_interval_ms: number;
    concurrency: number;
    keep_completed: number;
  };
  bull_board: { enabled: boolean; path: string };
  log_level: string;
  response_validation: 'off' | 'log' | 'strict';
}

export const DRIVER_CONFIG_SCHEMA: ConfigSchema = {
  type: 'object',
  additionalProperties: false,
  properties: {
    listen: {
      type: 'object',
      description: 'Where the REST API listens.',
      default: {},
      additionalProperties: false,
      properties: {
        host: { type: 'string', default: '127.0.0.1', description: 'Address to bind.' },
        port: { type: 'integer', minimum: 0, maximum: 65535, default: 9612, description: 'TCP port; 0 picks a free one.' },
      },
    },
    auth: {
      type: 'object',
      description: 'Bearer-token authentication of the API and of /queues (where the token is the Basic-auth password).',
      default: {},
      additionalProperties: false,
      properties: {
        tokens: { type: 'array', items: { type: 'string', minLength: 16 }, default: [], secret: true, description: 'Accepted tokens (at least 16 characters).' },
        token_file: { type: 'string', description: 'A file with one accepted token per line (added to tokens).' },
        disabled: { type: 'boolean', default: false, description: 'Serve without authentication. Only for tests and labs on loopback.' },
      },
    },
    redis: {
      type: 'object',
      description: 'The Redis that holds queues and deployments.',
      default: {},
      additionalProperties: false,
      properties: {
        url: { type: 'string', pattern: '^rediss?://', default: 'redis://127.0.0.1:6379/0', description: 'redis:// or rediss:// URL (password in the URL is redacted from logs).' },
        prefix: { type: 'string', pattern: '^[a-z0-9_-]+$', default: 'smartnic', description: 'Key prefix for queues and deployment records.' },
      },
    },
    agent: {
      type: 'object',
      description: 'How the service talks to DPU agents.',
      default: {},
      additionalProperties: false,
      properties: {
        token: { type: 'string', secret: true, description: "Bearer token for agents whose node has no driver_info['smartnic_agent_token']." },
        timeout_ms: { type: 'integer', minimum: 100, default: 15000, description: 'Timeout of one agent API call.' },
      },
    },
    jobs: {
      type: 'object',
      description: 'Job policy.',
      default: {},
      additionalProperties: false,
      properties: {
        attach_attempts: { type: 'integer', minimum: 1, default: 8, description: 'Attempts of an attach job on transient errors (exponential backoff).' },
        teardown_attempts: { type: 'integer', minimum: 1, default: 12, description: 'Attempts of a teardown job on transient errors.' },
        backoff_ms: { type: 'integer', minimum: 10, default: 1000, description: 'First backoff delay; doubles per attempt.' },
        export_timeout_ms: { type: 'integer', minimum: 1000, default: 120000, description: 'How long attach waits for the agent to report the export ready.' },
        monitor_interval_ms: { type: 'integer', minimum: 50, default: 2000, description: 'How often a monitor job polls hydration progress.' },
        concurrency: { type: 'integer', minimum: 1, default: 8, description: 'Jobs one service process runs at once, per queue.' },
        keep_completed: { type: 'integer', minimum: 0, default: 1000, description: 'Completed jobs kept per queue for inspection.' },
      },
    },
    bull_board: {
      type: 'object',
      description: 'The bull-board UI.',
      default: {},
      additionalProperties: false,
      properties: {
        enabled: { type: 'boolean', default: true, description: 'Mount bull-board.' },
        path: { type: 'string', pattern: '^/[a-z0-9/_-]*$', default: '/queues', description: 'Where it is mounted.' },
      },
    },
    log_level: { type: 'string', enum: ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'], default: 'info', description: 'pino level.' },
    response_validation: { type: 'string', enum: ['off', 'log', 'strict'], default: 'off', description: 'Check API responses against openapi/driver.yaml (tests use strict).' },
  },
};

/** Loads (or, for tests, takes) the config; adds token_file tokens; refuses to run unauthenticated by accident. */
export function resolveDriverConfig(source: { file: string } | { object: unknown }): Readonly<DriverConfig> {
  const cfg = 'file' in source ? loadConfigFile<DriverConfig>(DRIVER_CONFIG_SCHEMA, source.file) : validateConfig<DriverConfig>(DRIVER_CONFIG_SCHEMA, source.object, 'config');
  let tokens = [...cfg.auth.tokens];
  if (cfg.auth.token_file) {
    let text: string;
    try {
      text = fs.readFileSync(cfg.auth.token_file, 'utf8');
    } catch (err) {
      throw new ConfigError(`config key "auth.token_file": cannot read ${cfg.auth.token_file}: ${(err as Error).message}`, 'auth.token_file');
    }
    tokens = tokens.concat(text.split('\n').map((l) => l.trim()).filter(Boolean));
  }
  if (tokens.length === 0 && !cfg.auth.disabled) {
    throw new ConfigError('config key "auth.tokens": no token configured; set auth.tokens or auth.token_file (or auth.disabled: true for a loopback lab)', 'auth.tokens');
  }
  return Object.freeze({ ...cfg, auth: Object.freeze({ ...cfg.auth, tokens: cfg.auth.disabled ? [] : tokens }) });
}

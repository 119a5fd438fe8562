/**
 * `dpu-agent serve --config FILE`: the daemon. Wires the config, the root logger, the disk
 * manager and the API together, then listens. When the API is up it prints one JSON line
 * on stdout, `{"event":"listening","url":…}`. SIGTERM or SIGINT: the API stops accepting
 * requests (those in flight finish), every disk is closed — its region map committed —
 * and the process exits 0; the next start resumes every disk.
 */
import fs from 'node:fs';
import net from 'node:net';
import { pino } from 'pino';
import { ConfigError } from '../../../common/src/config.js';
import { type FlagTable, parseFlags, renderHelp } from '../cli/flags.js';
import { DpuError } from '../../../image-access/src/errors.js';
import { buildAgentApi, REDACT_PATHS } from './api.js';
import { type AgentConfig, agentApiTls, loadAgentConfig, renderConfigHelp } from './config.js';
import { DiskManager } from './disks.js';

export const SERVE_FLAGS: FlagTable = {
  config: { kind: 'string', arg: 'FILE', required: true, help: 'YAML or JSON config file; the keys are listed below.' },
};

const USAGE = 'dpu-agent serve --config FILE';
const SUMMARY = `Run the agent daemon: a management API (openapi/dpu-agent.yaml) that creates, lists,
changes and deletes streaming disks, each exported over NBD on its own unix socket. Disks
survive restarts: on start-up every disk under state_dir is resumed. SIGTERM or SIGINT
commits every disk's state and exits 0.`;

export function serveHelp(): string {
  return `${renderHelp(USAGE, SUMMARY, SERVE_FLAGS)}\nConfig keys (nested keys dotted; docs/dpu-agent.md has the table):\n${renderConfigHelp()}`;
}

/** An address only this machine reaches: 127.0.0.0/8 (also IPv4-mapped), ::1, localhost. */
function isLoopback(host: string): boolean {
  const h = host.toLowerCase().replace(/^::ffff:/, '');
  return h === 'localhost' || /^127\.\d+\.\d+\.\d+$/.test(h) || (net.isIPv6(h) && new net.SocketAddress({ address: h, family: 'ipv6' }).address === '::1');
}

export async function runServe(argv: string[]): Promise<number> {
  const f = parseFlags(SERVE_FLAGS, argv, 'serve');
  if (f['help']) {
    process.stdout.write(serveHelp());
    return 0;
  }
  const file = String(f['config']);
  let config: Readonly<AgentConfig>;
  try {
    config = loadAgentConfig(file);
  } catch (err) {
    if (err instanceof ConfigError) throw new DpuError('DPU_ERR_CONFIG', err.message);
    throw err;
  }
  const log = pino({ level: config.log_level, base: { pid: process.pid }, redact: { paths: REDACT_PATHS, censor: 'REDACTED' } }, pino.destination(2));
  if (config.auth.disabled) log.warn('authentication is disabled (auth.disabled): anyone who reaches the API controls the disks');
  if (config.tcp_exports_allowed && !config.nbd_tls) {
    log.warn('TCP exports are allowed without TLS (no nbd_tls): anyone who reaches an export\'s port reads and writes its disk, in plaintext');
  } else if (config.nbd_tls && !config.tcp_exports_allowed) {
    log.warn('nbd_tls is set but tcp_exports_allowed is false: TLS applies to TCP exports only, and there will be none');
  } else if (config.nbd_tls?.mode === 'allow') {
    log.warn('nbd_tls.mode is "allow": TCP exports also serve clients that do not start TLS');
  }
  if (!config.listen.tls && !isLoopback(config.listen.host)) {
    log.warn({ host: config.listen.host }, 'the API listens beyond loopback without TLS (no listen.tls): bearer tokens, peer tokens and the regions peers read cross the network in plaintext');
  }
  for (const secretFile of [file, config.auth.token_file]) {
    if (secretFile && (fs.statSync(secretFile).mode & 0o077) !== 0 && (secretFile === config.auth.token_file || config.auth.tokens.length > 0)) {
      log.warn({ file: secretFile }, 'a file holding API tokens is readable by group or others; chmod 600 it');
    }
  }

  const tls = agentApiTls(config); // before any disk is opened: a file replaced since the config was checked
  const manager = new DiskManager({ config, log });
  await manager.start();
  const app = buildAgentApi({ config, manager, log, responseValidation: 'log', ...(tls ? { tls } : {}) });
  let url: string;
  try {
    url = await app.listen({ host: config.listen.host, port: config.listen.port });
  } catch (err) {
    await manager.close();
    throw new DpuError('DPU_ERR_CONFIG', `cannot listen on ${config.listen.host}:${config.listen.port} (config key listen): ${(err as Error).message}`);
  }
  log.info({ url, disks: manager.count }, 'API listening');
  process.stdout.write(JSON.stringify({ event: 'listening', url }) + '\n');

  const signal = await new Promise<string>((resolve) => {
    const onTerm = (): void => done('SIGTERM');
    const onInt = (): void => done('SIGINT');
    const done = (sig: string): void => {
      // A second signal gets the default action: a way out if closing hangs.
      process.off('SIGTERM', onTerm);
      process.off('SIGINT', onInt);
      resolve(sig);
    };
    process.on('SIGTERM', onTerm);
    process.on('SIGINT', onInt);
  });
  log.info({ signal }, 'stopping: closing the API, then every disk');
  await app.close();
  await manager.close();
  process.stdout.write(JSON.stringify({ event: 'stopped' }) + '\n');
  log.info('stopped');
  return 0;
}

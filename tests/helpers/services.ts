/**
 * The control plane's real processes for tests: the DPU agent daemon (`dpu-agent serve`)
 * and the driver service (`smartnic-driver serve`), each started with a config file of
 * its own on a free loopback port, waited for through its `listening` line, stopped by PID.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { stringify } from 'yaml';
import { type Deployment, type DriverClient } from '../../openapi/clients/driver-client.js';
import { ApiError } from '../../openapi/clients/http.js';
import { freePort } from './redis.js';

const ROOT = fileURLToPath(new URL('../../../', import.meta.url));
export const TOKEN = 'test-token-0123456789abcdef';
/** Characters of a service's output (stdout and stderr: its log) kept for assertions. */
const OUTPUT_KEPT = 1 << 20;

/** The node flags `dpu-agent serve` is run with (docs/dpu-agent.md, "Memory"). */
export const AGENT_NODE_FLAGS = ['--max-semi-space-size=1', '--optimize-for-size'] as const;

export class ServiceProcess {
  child: ChildProcess | null = null;
  url = '';
  output = '';

  constructor(
    readonly name: string,
    private readonly bin: string,
    readonly configFile: string,
    /** node flags, as a deployment runs the service (docs/dpu-agent.md, "Memory"). */
    private readonly nodeFlags: readonly string[] = [],
    /** A command that runs node (e.g. `ip netns exec <ns>`: it execs, so the PID is node's). */
    private readonly wrap: readonly string[] = [],
  ) {}

  async start(timeoutMs = 30_000): Promise<void> {
    const argv = [process.execPath, ...this.nodeFlags, path.resolve(ROOT, this.bin), 'serve', '--config', this.configFile];
    const command = [...this.wrap, ...argv];
    const child = spawn(command[0]!, command.slice(1), { stdio: ['ignore', 'pipe', 'pipe'] });
    this.child = child;
    child.stderr!.setEncoding('utf8').on('data', (d: string) => {
      this.output = (this.output + d).slice(-OUTPUT_KEPT);
    });
    this.url = await new Promise<string>((resolve, reject) => {
      let buf = '';
      const timer = setTimeout(() => reject(new Error(`${this.name} did not start within ${timeoutMs} ms:\n${this.output}`)), timeoutMs);
      child.stdout!.setEncoding('utf8').on('data', (d: string) => {
        this.output = (this.output + d).slice(-OUTPUT_KEPT); // the driver logs to stdout
        buf += d;
        const line = buf.split('\n').find((l) => l.includes('"listening"'));
        if (line) {
          clearTimeout(timer);
          resolve((JSON.parse(line) as { url: string }).url);
        }
      });
      child.once('exit', (code) => {
        clearTimeout(timer);
        reject(new Error(`${this.name} exited (${code}) during start-up:\n${this.output}`));
      });
    });
  }

  /**
   * Sends `signal` and waits for the exit; returns the exit code. A service still running
   * `graceMs` later is killed (SIGKILL) and, once it is gone, stop() throws with the tail
   * of its output: a service that hangs on shutdown fails the hook or test that stopped
   * it, instead of hanging the suite until mocha's timeout and outliving it.
   */
  async stop(signal: NodeJS.Signals = 'SIGTERM', graceMs = 30_000): Promise<number | null> {
    const c = this.child;
    this.child = null;
    if (!c || c.exitCode !== null || c.signalCode !== null) return c?.exitCode ?? null;
    const exited = new Promise<number | null>((r) => c.once('exit', (code) => r(code)));
    c.kill(signal);
    let killed = false;
    const timer = setTimeout(() => {
      killed = true;
      c.kill('SIGKILL');
    }, graceMs);
    try {
      const code = await exited;
      if (killed) throw new Error(`${this.name} did not exit within ${graceMs} ms of ${signal}: killed (SIGKILL). Its last output:\n${this.output.slice(-4000)}`);
      return code;
    } finally {
      clearTimeout(timer);
    }
  }
}

export interface AgentSetup {
  dir: string;
  port?: number;
  extra?: Record<string, unknown>;
  /** More node flags (e.g. `--cpu-prof`), after the deployed ones. */
  nodeFlags?: readonly string[];
  /** The address to listen on (default 127.0.0.1), e.g. a network namespace's. */
  host?: string;
  /** A command that runs the agent's node elsewhere: `ip netns exec <ns>` (tests/helpers/netns.ts). */
  wrap?: readonly string[];
}

/** A DPU agent daemon whose targets live under `<dir>/targets/`. */
export async function agentDaemon(s: AgentSetup): Promise<ServiceProcess> {
  const port = s.port ?? (await freePort());
  fs.mkdirSync(path.join(s.dir, 'targets'), { recursive: true });
  const cfg = {
    listen: { host: s.host ?? '127.0.0.1', port },
    auth: { tokens: [TOKEN] },
    state_dir: path.join(s.dir, 'state'),
    export_dir: path.join(s.dir, 'exports'),
    allowed_targets: [path.join(s.dir, 'targets') + '/'],
    log_level: 'warn',
    ...s.extra,
  };
  const file = path.join(s.dir, 'agent.yaml');
  fs.writeFileSync(file, stringify(cfg));
  return new ServiceProcess('dpu-agent', 'dpu-agent/bin/dpu-agent.js', file, [...AGENT_NODE_FLAGS, ...(s.nodeFlags ?? [])], s.wrap);
}

export interface DriverSetup {
  dir: string;
  redisUrl: string;
  port?: number;
  jobs?: Record<string, number>;
  /** More config keys (e.g. `glance`, `log_level`), merged over the defaults here. */
  extra?: Record<string, unknown>;
}

export async function driverService(s: DriverSetup): Promise<ServiceProcess> {
  const port = s.port ?? (await freePort());
  const cfg = {
    listen: { host: '127.0.0.1', port },
    auth: { tokens: [TOKEN] },
    redis: { url: s.redisUrl, prefix: 'test' },
    agent: { token: TOKEN, timeout_ms: 5000 },
    jobs: { attach_attempts: 4, teardown_attempts: 6, backoff_ms: 200, monitor_interval_ms: 200, ...s.jobs },
    response_validation: 'strict',
    log_level: 'warn',
    ...s.extra,
  };
  fs.mkdirSync(s.dir, { recursive: true });
  const file = path.join(s.dir, `driver-${port}.yaml`);
  fs.writeFileSync(file, stringify(cfg));
  return new ServiceProcess('smartnic-driver', 'driver/bin/smartnic-driver.js', file);
}

/** Polls `fn` until it returns a truthy value. */
export async function until<T>(what: string, fn: () => Promise<T | null | undefined | false>, timeoutMs = 30_000, everyMs = 100): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  let last: unknown;
  for (;;) {
    try {
      const v = await fn();
      if (v) return v;
    } catch (err) {
      last = err;
    }
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}${last ? `: ${(last as Error).message}` : ''}`);
    await new Promise((r) => setTimeout(r, everyMs));
  }
}

/** Waits until the node's deployment is in one of `want` (failing at once if it failed and that is not wanted). */
export function deploymentIn(api: DriverClient, node: string, want: Deployment['state'][], timeoutMs = 60_000): Promise<Deployment> {
  return until(`${node} in ${want.join('/')}`, async () => {
    const d = await api.getDeployment(node);
    if (d.state === 'failed' && !want.includes('failed')) throw new Error(`deployment failed: ${d.last_error}`);
    return want.includes(d.state) ? d : null;
  }, timeoutMs);
}

/** Waits until the node's deployment satisfies `ok` (`what` says what, for the timeout's message); a failed one throws. */
export function deploymentWhere(api: DriverClient, node: string, ok: (d: Deployment) => boolean, what: string, timeoutMs = 60_000): Promise<Deployment> {
  return until(`${node}: ${what}`, async () => {
    const d = await api.getDeployment(node);
    if (d.state === 'failed') throw new Error(`deployment failed: ${d.last_error}`);
    return ok(d) ? d : null;
  }, timeoutMs);
}

/** Waits until the node has no deployment (404). */
export function deploymentGone(api: DriverClient, node: string, timeoutMs = 30_000): Promise<boolean> {
  return until(`${node} deleted`, () => api.getDeployment(node).then(() => false, (err: unknown) => err instanceof ApiError && err.status === 404), timeoutMs);
}

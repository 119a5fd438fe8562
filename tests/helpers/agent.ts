/**
 * Runs `dpu-agent stream` as a real process (the bin a user runs) and follows its JSON
 * line events on stdout.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const AGENT_BIN = fileURLToPath(new URL('../../../dpu-agent/bin/dpu-agent.js', import.meta.url));

export interface AgentEvent {
  event: string;
  [k: string]: unknown;
}

export interface StreamArgs {
  source: string;
  target: string;
  state: string;
  socket: string;
  extra?: string[];
  /**
   * Poison pooled reply buffers when their request ends and check them before reuse (a test
   * build's guard: common for tests, wrong for benchmarks, where it costs a scan of every
   * buffer on the event loop). @default true
   */
  poison?: boolean;
  /** Extra environment (e.g. NODE_EXTRA_CA_CERTS for an https origin with a private CA). */
  env?: Record<string, string>;
  /** node's own flags, before the script (e.g. the deployed --max-semi-space-size=1). */
  nodeArgs?: string[];
}

export class AgentProcess {
  readonly events: AgentEvent[] = [];
  readonly child: ChildProcess;
  stderr = '';
  private exited: Promise<number | null>;
  private waiters: { pred: (e: AgentEvent) => boolean; resolve: (e: AgentEvent) => void }[] = [];

  constructor(args: StreamArgs) {
    const argv = [AGENT_BIN, 'stream', '--source', args.source, '--target', args.target, '--state', args.state, '--listen', `unix:${args.socket}`, '--progress', 'json', '--log-level', 'warn', ...(args.extra ?? [])];
    const env = { ...process.env, ...(args.env ?? {}) };
    if (args.poison ?? true) env['DPU_AGENT_POISON_BUFFERS'] = '1';
    else delete env['DPU_AGENT_POISON_BUFFERS'];
    this.child = spawn(process.execPath, [...(args.nodeArgs ?? []), ...argv], { stdio: ['ignore', 'pipe', 'pipe'], env });
    let buf = '';
    this.child.stdout!.setEncoding('utf8').on('data', (d: string) => {
      buf += d;
      let i;
      while ((i = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, i);
        buf = buf.slice(i + 1);
        if (!line.trim()) continue;
        const ev = JSON.parse(line) as AgentEvent;
        this.events.push(ev);
        this.waiters = this.waiters.filter((w) => (w.pred(ev) ? (w.resolve(ev), false) : true));
      }
    });
    this.child.stderr!.setEncoding('utf8').on('data', (d: string) => {
      this.stderr += d;
    });
    this.exited = new Promise((resolve) => this.child.on('exit', (code) => resolve(code)));
  }

  /** Resolves with the first event (past or future) that matches; rejects if the agent exits first. */
  waitFor(pred: (e: AgentEvent) => boolean, timeoutMs = 30_000): Promise<AgentEvent> {
    const seen = this.events.find(pred);
    if (seen) return Promise.resolve(seen);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`no matching agent event within ${timeoutMs} ms; stderr:\n${this.stderr.slice(-2000)}`)), timeoutMs);
      this.waiters.push({
        pred,
        resolve: (e) => {
          clearTimeout(timer);
          resolve(e);
        },
      });
      void this.exited.then((code) => {
        clearTimeout(timer);
        reject(new Error(`agent exited (${code}) before the event; stderr:\n${this.stderr.slice(-2000)}`));
      });
    });
  }

  listening(timeoutMs = 30_000): Promise<AgentEvent> {
    return this.waitFor((e) => e.event === 'listening', timeoutMs);
  }

  complete(timeoutMs = 60_000): Promise<AgentEvent> {
    return this.waitFor((e) => e.event === 'complete', timeoutMs);
  }

  latestProgress(): AgentEvent | undefined {
    return [...this.events].reverse().find((e) => e.event === 'progress' || e.event === 'listening');
  }

  /** SIGTERM and wait for a clean exit; returns the exit code. */
  async stop(): Promise<number | null> {
    if (this.child.exitCode !== null) return this.child.exitCode;
    this.child.kill('SIGTERM');
    return this.exited;
  }

  /** SIGKILL: a crash, nothing committed on the way out. */
  async kill(): Promise<void> {
    if (this.child.exitCode === null && this.child.signalCode === null) {
      this.child.kill('SIGKILL');
      await this.exited;
    }
  }

  exitCode(): Promise<number | null> {
    return this.exited;
  }
}

/** A fresh temporary directory, removed by the returned cleanup. */
export function tempDir(prefix: string): { dir: string; cleanup: () => void } {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), `${prefix}-`));
  return { dir, cleanup: () => fs.rmSync(dir, { recursive: true, force: true }) };
}

/** A file of `size` bytes: random data with an all-zero stretch in the middle. */
export function makeImage(file: string, size: number, seed = 1): void {
  const buf = Buffer.alloc(size);
  let x = seed >>> 0 || 1;
  for (let i = 0; i + 4 <= size; i += 4) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    buf.writeUInt32LE(x >>> 0, i);
  }
  buf.fill(0, Math.floor(size * 0.4), Math.floor(size * 0.5));
  fs.writeFileSync(file, buf);
}

export function nbdUri(socket: string): string {
  return `nbd+unix:///?socket=${socket}`;
}

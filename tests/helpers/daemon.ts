/**
 * Runs `dpu-agent serve --config FILE` as a real process (the bin an operator runs) and
 * waits for its `{"event":"listening","url":…}` line on stdout.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { AGENT_BIN } from './agent.js';

export class DaemonProcess {
  readonly child: ChildProcess;
  stdout = '';
  stderr = '';
  private readonly exited: Promise<number | null>;

  constructor(configFile: string) {
    this.child = spawn(process.execPath, [AGENT_BIN, 'serve', '--config', configFile], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, DPU_AGENT_POISON_BUFFERS: '1' } });
    this.child.stdout!.setEncoding('utf8').on('data', (d: string) => {
      this.stdout += d;
    });
    this.child.stderr!.setEncoding('utf8').on('data', (d: string) => {
      this.stderr += d;
    });
    this.exited = new Promise((resolve) => this.child.on('exit', (code) => resolve(code)));
  }

  /** Resolves with the API's URL once the daemon prints its listening line. */
  async listening(timeoutMs = 30_000): Promise<string> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const line = this.events().find((e) => e['event'] === 'listening');
      if (line) return String(line['url']);
      if (this.child.exitCode !== null) throw new Error(`the daemon exited (${this.child.exitCode}) before listening; stderr:\n${this.stderr.slice(-2000)}`);
      if (Date.now() > deadline) throw new Error(`the daemon did not listen within ${timeoutMs} ms; stderr:\n${this.stderr.slice(-2000)}`);
      await new Promise((r) => setTimeout(r, 50));
    }
  }

  events(): Record<string, unknown>[] {
    return this.stdout
      .split('\n')
      .filter((l) => l.trim())
      .map((l) => JSON.parse(l) as Record<string, unknown>);
  }

  /** SIGTERM and wait; returns the exit code. */
  async stop(): Promise<number | null> {
    if (this.child.exitCode !== null) return this.child.exitCode;
    this.child.kill('SIGTERM');
    return this.exited;
  }

  /** SIGKILL: nothing committed on the way out. */
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

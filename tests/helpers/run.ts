/** Runs a program to completion and returns its output; rejects with stderr on failure. */
import { execFile } from 'node:child_process';

export interface RunResult {
  stdout: string;
  stderr: string;
  code: number;
}

export function run(cmd: string, args: string[], opts: { timeoutMs?: number; allowFail?: boolean; env?: NodeJS.ProcessEnv } = {}): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    execFile(cmd, args, { timeout: opts.timeoutMs ?? 120_000, maxBuffer: 64 << 20, env: opts.env ?? process.env }, (err, stdout, stderr) => {
      const code = err ? (typeof (err as { code?: unknown }).code === 'number' ? ((err as { code: number }).code) : -1) : 0;
      if (err && !opts.allowFail) {
        reject(new Error(`${cmd} ${args.join(' ')} failed (${code}): ${stderr || err.message}`));
        return;
      }
      resolve({ stdout, stderr, code });
    });
  });
}

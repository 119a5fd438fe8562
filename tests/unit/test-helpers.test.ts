/**
 * The test harness's own process handling: a service that ignores SIGTERM must not hang
 * a suite's `after` hook (and leave its process behind) until mocha's timeout.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { tempDir } from '../helpers/agent.js';
import { ServiceProcess } from '../helpers/services.js';

describe('test helpers: ServiceProcess.stop', function () {
  this.timeout(30_000);
  let dir: string;
  let cleanup: () => void;
  before(() => ({ dir, cleanup } = tempDir('service-stop')));
  after(() => cleanup());

  /** A "service" that does what `body` does, then says it listens. */
  const service = (name: string, body: string): ServiceProcess => {
    const bin = path.join(dir, `${name}.mjs`);
    fs.writeFileSync(bin, `${body}\nconsole.log(JSON.stringify({ msg: 'listening', url: 'http://127.0.0.1:1' }));\n`);
    return new ServiceProcess(name, bin, path.join(dir, 'none.yaml'));
  };

  it('returns the exit code of a service that stops on SIGTERM', async () => {
    const s = service('polite', "process.on('SIGTERM', () => process.exit(7)); setInterval(() => undefined, 1000);");
    await s.start();
    assert.equal(await s.stop(), 7);
  });

  it('kills a service that ignores SIGTERM after the grace period, then fails with its output', async () => {
    const s = service('stubborn', "process.on('SIGTERM', () => console.log('ignoring SIGTERM')); setInterval(() => undefined, 1000);");
    await s.start();
    const pid = s.child!.pid!;
    // A first SIGTERM, seen ignored before stop() sends its own: nothing here races the grace period.
    process.kill(pid, 'SIGTERM');
    while (!/ignoring SIGTERM/.test(s.output)) await new Promise((r) => setTimeout(r, 10));
    await assert.rejects(s.stop('SIGTERM', 500), /^Error: stubborn did not exit within 500 ms of SIGTERM: killed \(SIGKILL\)\. Its last output:\n.*"listening"/);
    assert.throws(() => process.kill(pid, 0), /ESRCH/, 'the process is gone');
  });
});

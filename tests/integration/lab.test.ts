/**
 * The main job, end to end, as `npm run lab` runs it: Glance on Swift, Ironic with the
 * smartnic-ipmi node behind ipmi_sim, the driver service, the DPU agent, and a QEMU host
 * booting from the streaming disk. The host must reach its boot marker while hydration is
 * still incomplete — made a fact, not a race against the clock, by --hold-hydration: the
 * agent holds the background copy until the marker, so the boot ran on regions fetched on
 * demand — the local disk must equal the image at the end, and undeploy must wipe it. Swift sits in a network namespace behind the default emulated 1 Gbit/s link
 * (its own index, so a lab running beside the test keeps its own), removed at the end.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { tempDir } from '../helpers/agent.js';
import { run } from '../helpers/run.js';

const LAB = fileURLToPath(new URL('../../lab/lab.js', import.meta.url));
const LINK_INDEX = '201';

describe('the lab (npm run lab)', function () {
  this.timeout(300_000);
  let dir: string;
  let cleanup: () => void;
  before(() => ({ dir, cleanup } = tempDir('lab')));
  after(async () => {
    await run(process.execPath, [LAB, 'down', '--dir', path.join(dir, 'lab')], { allowFail: true });
    cleanup();
  });

  it('deploys through Ironic, boots while hydrating, ends with the image local and undeploy wipes it', async () => {
    const res = await run(process.execPath, [LAB, '--json', '--hold-hydration', '--image-mib', '64', '--bandwidth', '4M', '--link-index', LINK_INDEX, '--dir', path.join(dir, 'lab')], { timeoutMs: 280_000, allowFail: true });
    const line = res.stdout.trim().split('\n').pop() ?? '';
    assert.equal(res.code, 0, `lab failed:\n${res.stderr.slice(-3000)}`);
    const s = JSON.parse(line) as Record<string, number | boolean | null>;
    console.log(`      deploy→ACTIVE ${s['deploy_to_active_ms']} ms, deploy→marker ${s['deploy_to_boot_marker_ms']} ms, deploy→hydrated ${s['deploy_to_hydrated_ms']} ms`);
    // State and counters, not timestamps: the copy was paused until the marker, so what was
    // local then is what the boot read, fetched on demand — less than the image.
    assert.equal(s['hydration_held_until_marker'], true, 'the background copy was held until the boot marker');
    assert.ok((s['hydrated_fraction_at_marker'] as number) < 1, `the host booted before hydration finished (${s['hydrated_fraction_at_marker']} local)`);
    assert.ok((s['bytes_fetched_at_marker'] as number) > 0, 'the boot read its regions from the origin on demand');
    assert.equal(s['local_disk_equals_image'], true);
    assert.equal(s['verified'], true, 'every region was checked against the manifest built from Glance\'s digest');
    assert.equal(s['wiped_on_undeploy'], true);
    assert.ok((s['fetched_over_image'] as number) <= 1.01, `fetched ${s['fetched_over_image']}× the image`);
    assert.equal(s['link_bytes_per_s'], 125_000_000, 'Swift behind the default 1 Gbit/s link');
    assert.doesNotMatch(execFileSync('ip', ['netns', 'list'], { encoding: 'utf8' }), new RegExp(`^snlab${LINK_INDEX}\\b`, 'm'), 'the namespace was removed');
    const status = await run(process.execPath, [LAB, 'status', '--dir', path.join(dir, 'lab')], { allowFail: true });
    assert.match(status.stdout, /no lab running/, 'everything was stopped');
  });
});

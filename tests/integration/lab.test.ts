/**
 * The main job, end to end, as `npm run lab` runs it: a real Debian 12 cloud image in Glance
 * on Swift, Ironic with the smartnic-ipmi node behind ipmi_sim, the driver service, the DPU
 * agent, and a QEMU host booting UEFI from the streaming disk, with a config drive (SSH key,
 * user data) on a 4 GiB root disk. The host must reach its login prompt and cloud-init must
 * run the user data while hydration is still incomplete — made a fact, not a race against
 * the clock, by --hold-hydration: the agent holds the background copy until cloud-init has
 * finished, so all of it ran on regions fetched on demand. cloud-init must find the config
 * drive, grow the root, install the key (ssh logs in with it); every fetched region is
 * verified, and undeploy must wipe the disk. Swift sits in a network namespace behind the default emulated 1 Gbit/s link
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
  this.timeout(900_000);
  let dir: string;
  let cleanup: () => void;
  before(() => ({ dir, cleanup } = tempDir('lab')));
  after(async () => {
    await run(process.execPath, [LAB, 'down', '--dir', path.join(dir, 'lab')], { allowFail: true });
    cleanup();
  });

  it('deploys a real cloud image with a config drive through Ironic: UEFI boot, cloud-init runs the user data while hydrating, the root grows, the key logs in; undeploy and automated cleaning zero the DPU\'s disk', async () => {
    const res = await run(process.execPath, [LAB, '--json', '--hold-hydration', '--link-index', LINK_INDEX, '--dir', path.join(dir, 'lab')], { timeoutMs: 880_000, allowFail: true });
    const line = res.stdout.trim().split('\n').pop() ?? '';
    assert.equal(res.code, 0, `lab failed:\n${res.stderr.slice(-3000)}\n${line}`);
    const s = JSON.parse(line) as Record<string, number | boolean | string | null>;
    console.log(`      deploy→ACTIVE ${s['deploy_to_active_ms']} ms, deploy→login ${s['deploy_to_login_ms']} ms, deploy→cloud-init done ${s['deploy_to_cloud_init_ms']} ms, deploy→hydrated ${s['deploy_to_hydrated_ms']} ms; boot fetched ${s['bytes_fetched_at_marker']} bytes`);
    assert.equal(s['image'], 'debian');
    // State and counters, not timestamps: the copy was paused until cloud-init had finished,
    // so the boot and the user data ran on regions fetched on demand.
    assert.equal(s['hydration_held_until_marker'], true, 'the background copy was held until cloud-init finished');
    assert.ok((s['hydrated_fraction_at_cloud_init'] as number) < 1, `cloud-init finished before hydration did (${s['hydrated_fraction_at_cloud_init']} local)`);
    assert.ok((s['bytes_fetched_at_marker'] as number) > 0 && (s['bytes_fetched_at_marker'] as number) < (s['image_bytes'] as number), 'the boot read part of the image, on demand');
    assert.equal(s['cloud_init_datasource'], 'configdrive', 'cloud-init found the config drive');
    assert.equal(s['ssh_key_installed'], true);
    assert.equal(s['ssh_login_with_config_drive_key'], true);
    assert.equal(s['config_drive_intact'], true);
    assert.equal(s['disk_bytes'], 4 * 2 ** 30, 'the disk is root_gb');
    assert.ok((s['root_fs_bytes'] as number) > 3 * 2 ** 30, `the root file system grew over the root disk (${s['root_fs_bytes']} bytes)`);
    assert.equal(s['verified'], true, 'every region fetched was checked against the manifest built from Glance\'s digest');
    assert.equal(s['cleaning_last_step'], 'erase_devices done', 'automated cleaning ran the DPU\'s erase_devices');
    assert.equal(s['wiped_on_undeploy'], true, 'undeploy then automated cleaning left the DPU\'s disk zeroed');
    assert.ok((s['fetched_over_image'] as number) <= 1.01, `fetched ${s['fetched_over_image']}× the image`);
    assert.equal(s['link_bytes_per_s'], 125_000_000, 'Swift behind the default 1 Gbit/s link');
    assert.doesNotMatch(execFileSync('ip', ['netns', 'list'], { encoding: 'utf8' }), new RegExp(`^snlab${LINK_INDEX}\\b`, 'm'), 'the namespace was removed');
    const status = await run(process.execPath, [LAB, 'status', '--dir', path.join(dir, 'lab')], { allowFail: true });
    assert.match(status.stdout, /no lab running/, 'everything was stopped');
  });
});

/**
 * The image policy and boot mode of the smartnic-streaming interface on a real Ironic
 * (Debian's 21.4) with a real Glance on Swift (tests/helpers/openstack.ts), redis-server,
 * the DPU agent and a driver service that has NO Glance configuration: every Glance image
 * here is resolved by Ironic's own image service (`[smartnic]resolve_images_in_ironic`,
 * Ironic's `[glance]` without Keystone: tests/helpers/ironic.ts ironicGlanceConf).
 *
 *   - validate refuses, naming the field, what the interface cannot deploy: partition
 *     images (instance_info and Glance), missing checksums, disk formats the DPU does not
 *     serve, a Glance image Ironic cannot see, unknown boot modes, secure boot without a
 *     management interface that does it; no QEMU, no deploy;
 *   - a raw and a qcow2 Glance image deploy through the Swift temp URL Ironic made, and
 *     Ironic renews that URL while the copy outlives it;
 *   - a checksum is verified, in the algorithm Ironic reads it in;
 *   - the boot mode Ironic sets reaches the BMC (ipmi_sim, recorded at ipmitool: the
 *     EFI bit never reaches ipmi_sim's chassis program).
 */
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { DriverClient } from '../../openapi/clients/driver-client.js';
import { ApiError } from '../../openapi/clients/http.js';
import { tempDir } from '../helpers/agent.js';
import { imageInfoArgs, installPlugin, IronicServer, type IronicNode, ironicGlanceConf } from '../helpers/ironic.js';
import { type GlanceImage, OpenStack } from '../helpers/openstack.js';
import { TestOrigin } from '../helpers/origin.js';
import { makeMixedImage, toQcow2 } from '../helpers/qcow2-images.js';
import { RedisServer } from '../helpers/redis.js';
import { agentDaemon, driverService, type ServiceProcess, TOKEN, until } from '../helpers/services.js';
import { IpmitoolRecorder, VirtualBmc } from '../helpers/vbmc.js';

const MiB = 1 << 20;
const TEMP_URL_KEY = 'policy-temp-url-key';
const TEMP_URL_SECONDS = 24;
const sha256 = (b: Buffer): string => createHash('sha256').update(b).digest('hex');

type Validation = { Interface: string; Result: boolean | null; Reason: string | null };

describe('Ironic image policy and boot mode (real Ironic, Glance on Swift, driver without Glance)', function () {
  this.timeout(300_000);
  let dir: string;
  let cleanup: () => void;
  let os: OpenStack;
  let redis: RedisServer;
  let agent: ServiceProcess;
  let driver: ServiceProcess;
  let api: DriverClient;
  let ironic: IronicServer;
  let ipmitool: IpmitoolRecorder;
  let origin: TestOrigin;
  let rawFile: string;
  let raw: Buffer;
  const glance: Record<'raw' | 'qcow2' | 'partition' | 'vmdk' | 'private', GlanceImage> = {} as never;
  let qcow2Disk: Buffer;

  before(async function () {
    this.timeout(180_000);
    ({ dir, cleanup } = tempDir('ironic-policy'));
    os = await OpenStack.start(path.join(dir, 'openstack'), { glance: ['swift'] });
    await os.swift.setTempUrlKey(TEMP_URL_KEY);
    const g = os.glance.swift!;
    raw = randomBytes(6 * MiB);
    rawFile = path.join(dir, 'image.raw');
    fs.writeFileSync(rawFile, raw);
    const mixed = path.join(dir, 'mixed.raw');
    makeMixedImage(mixed, 8 * MiB);
    qcow2Disk = fs.readFileSync(mixed);
    const qcow2File = path.join(dir, 'image.qcow2');
    await toQcow2(mixed, qcow2File);
    glance.raw = await g.uploadImage(raw, { name: 'raw', visibility: 'public' });
    glance.qcow2 = await g.uploadImage(fs.readFileSync(qcow2File), { name: 'qcow2', disk_format: 'qcow2', visibility: 'public' });
    glance.partition = await g.uploadImage(randomBytes(MiB), {
      name: 'partition',
      visibility: 'public',
      properties: { kernel_id: glance.raw.id, ramdisk_id: glance.raw.id },
    });
    glance.vmdk = await g.uploadImage(randomBytes(MiB), { name: 'vmdk', disk_format: 'vmdk', visibility: 'public' });
    glance.private = await g.uploadImage(randomBytes(MiB), { name: 'private', visibility: 'private' });
    origin = new TestOrigin({ file: rawFile });
    await origin.start();

    redis = new RedisServer(path.join(dir, 'redis'));
    await redis.start();
    agent = await agentDaemon({ dir: path.join(dir, 'agent') });
    // No `glance` key: the driver service cannot resolve a Glance image by itself.
    driver = await driverService({ dir, redisUrl: redis.url });
    const pluginDir = path.join(dir, 'plugin');
    await Promise.all([agent.start(), driver.start(), installPlugin(pluginDir)]);
    api = new DriverClient({ baseUrl: driver.url, token: TOKEN });
    ipmitool = new IpmitoolRecorder(path.join(dir, 'ipmitool'));
    ironic = await IronicServer.create({
      dir: path.join(dir, 'ironic'),
      pluginDir,
      pathPrefix: ipmitool.binDir,
      conf: {
        // Short-lived temp URLs: a capped copy outlives several (the renewal test).
        ...ironicGlanceConf(g.url, os.swift, TEMP_URL_KEY, TEMP_URL_SECONDS),
        smartnic: { driver_url: driver.url, token: TOKEN, deploy_timeout: 60, teardown_timeout: 30 },
      },
    });
    await ironic.start();
  });

  after(async () => {
    await ironic?.stop();
    await driver?.stop();
    await agent?.stop();
    await redis?.stop();
    await origin?.stop();
    await os?.stop();
    if (process.env['KEEP_TEST_DIRS']) console.log(`      kept ${dir}`);
    else cleanup?.();
  });

  const target = (name: string): string => path.join(dir, 'agent', 'targets', `${name}.raw`);

  async function availableNode(name: string, args: string[]): Promise<string> {
    const created = JSON.parse(await ironic.baremetal('node', 'create', '--name', name, ...args, '-f', 'json')) as IronicNode;
    await ironic.baremetal('node', 'manage', name);
    await ironic.waitForProvisionState(name, 'manageable');
    await ironic.baremetal('node', 'provide', name);
    await ironic.waitForProvisionState(name, 'available');
    return created.uuid;
  }

  const fakeNode = (name: string): Promise<string> =>
    availableNode(name, ['--driver', 'fake-hardware', '--deploy-interface', 'smartnic-streaming', '--driver-info', `smartnic_agent_url=${agent.url}`, '--driver-info', `smartnic_target=${target(name)}`]);

  async function deployValidation(name: string): Promise<Validation> {
    const rows = JSON.parse(await ironic.baremetal('node', 'validate', name, '-f', 'json')) as Validation[];
    return rows.find((r) => r.Interface === 'deploy')!;
  }

  const noDeployment = async (uuid: string): Promise<boolean> =>
    api.getDeployment(uuid).then(
      () => false,
      (err: unknown) => err instanceof ApiError && err.status === 404,
    );

  describe('validate refuses what the interface cannot deploy, naming the field', () => {
    let uuid = '';
    before(async () => {
      uuid = await fakeNode('pol-validate');
    });

    const http = (): Record<string, unknown> => ({ image_source: origin.url, image_os_hash_algo: 'sha256', image_os_hash_value: sha256(raw) });
    const cases: [string, () => Record<string, unknown>, RegExp][] = [
      ['an http image without a checksum', () => ({ image_source: origin.url }), /"image_checksum", or "image_os_hash_algo" and "image_os_hash_value" must be provided in instance_info/],
      ['a hash value without its algorithm', () => ({ image_source: origin.url, image_os_hash_value: sha256(raw) }), /"image_checksum", or "image_os_hash_algo" and "image_os_hash_value" must be provided/],
      ['a partition image (kernel and ramdisk)', () => ({ ...http(), kernel: `${origin.url}/vmlinuz`, ramdisk: `${origin.url}/initrd` }), /instance_info\["kernel"\] is set, which makes the image a partition image, but the SmartNIC streaming interface streams whole-disk images only/],
      ['image_type partition', () => ({ ...http(), image_type: 'partition' }), /instance_info\["image_type"\] is "partition" \(set by the user, or by Ironic .*whole-disk images only/],
      ['a vmdk image', () => ({ ...http(), image_disk_format: 'vmdk' }), /instance_info\["image_disk_format"\] is "vmdk": the SmartNIC streaming interface serves raw and qcow2 images only/],
      ['a partition image in Glance', () => ({ image_source: glance.partition.id }), /Glance image [0-9a-f-]+ is a partition image \(its property kernel_id and ramdisk_id\)/],
      ['a vmdk image in Glance', () => ({ image_source: glance.vmdk.id }), /the disk_format of Glance image [0-9a-f-]+ is "vmdk"/],
      ['a Glance image Ironic cannot see', () => ({ image_source: glance.private.id }), /cannot be found by Ironic \(without a Keystone token Ironic sees only public images/],
      ['an unknown boot mode', () => ({ ...http(), capabilities: { boot_mode: 'legacy' } }), /'boot_mode' from instance_info\['capabilities'\] has an invalid value: 'legacy'. Acceptable values are: bios, uefi/],
      ['secure boot that fake management cannot enable', () => ({ ...http(), capabilities: { secure_boot: 'true' } }), /requests secure boot \(capabilities secure_boot:true\), but its management interface fake cannot enable it/],
    ];
    for (const [what, info, reason] of cases) {
      it(what, async () => {
        await ironic.patchNode('pol-validate', [{ op: 'replace', path: '/instance_info', value: info() }]);
        const v = await deployValidation('pol-validate');
        assert.equal(v.Result, false, `validate accepted ${what}`);
        assert.match(v.Reason!, reason);
      });
    }

    it('the same refusal stops `node deploy`: the node stays available, nothing is asked of the driver service', async () => {
      await ironic.patchNode('pol-validate', [{ op: 'replace', path: '/instance_info', value: { ...http(), kernel: `${origin.url}/vmlinuz` } }]);
      const res = await ironic.baremetalResult('node', 'deploy', 'pol-validate');
      assert.notEqual(res.code, 0);
      assert.match(res.stderr, /instance_info\["kernel"\] is set/);
      assert.equal((await ironic.node('pol-validate')).provision_state, 'available');
      assert.ok(await noDeployment(uuid));
    });

    it('what it can deploy passes: an http image with a checksum, a whole-disk Glance image, boot mode bios', async () => {
      for (const info of [http(), { image_source: glance.raw.id }, { ...http(), capabilities: { boot_mode: 'bios' } }, { ...http(), image_disk_format: 'qcow2' }]) {
        await ironic.patchNode('pol-validate', [{ op: 'replace', path: '/instance_info', value: info }]);
        const v = await deployValidation('pol-validate');
        assert.equal(v.Result, true, `${JSON.stringify(info)}: ${v.Reason}`);
      }
    });
  });

  /** Deploys `name` to active, waits for the copy to complete, returns the node and its deployment. */
  async function deployToComplete(name: string, uuid: string): Promise<{ node: IronicNode; imageUrl: string }> {
    await ironic.baremetal('node', 'deploy', name);
    const node = await ironic.waitForProvisionState(name, 'active', 90_000);
    const d = await until('hydration complete', async () => {
      const dep = await api.getDeployment(uuid);
      assert.notEqual(dep.state, 'failed', dep.last_error ?? '');
      return dep.state === 'complete' ? dep : null;
    }, 60_000, 250);
    return { node, imageUrl: d.image_url };
  }

  it('a Glance image is resolved by Ironic: the driver service, without Glance credentials, streams the Swift temp URL Ironic made', async () => {
    // The driver service alone cannot: it has no glance.url.
    await assert.rejects(
      api.validate({ instance_info: { image_source: glance.raw.id }, driver_info: { smartnic_agent_url: agent.url, smartnic_target: target('x') } }),
      (err: unknown) => err instanceof ApiError && /no glance\.url configured/.test(err.message),
    );
    const uuid = await fakeNode('pol-glance');
    await ironic.baremetal('node', 'set', 'pol-glance', '--instance-info', `image_source=${glance.raw.id}`);
    const { node, imageUrl } = await deployToComplete('pol-glance', uuid);
    const ii = node.instance_info;
    const objectPath = `/v1/${os.swift.account}/glance/${glance.raw.id}`;
    // Ironic records the temp URL in instance_info and masks it in its API, as for the direct interface.
    assert.equal(ii['image_url'], '******');
    assert.equal(ii['image_os_hash_algo'], glance.raw.os_hash_algo);
    assert.equal(ii['image_os_hash_value'], glance.raw.os_hash_value);
    assert.equal(ii['image_checksum'], glance.raw.checksum);
    assert.equal(ii['image_disk_format'], 'raw');
    assert.equal(ii['image_type'], 'whole-disk');
    assert.ok(imageUrl.startsWith(`${os.swift.url}${objectPath}?`), `the driver streamed ${imageUrl}`);
    assert.doesNotMatch(imageUrl, /temp_url_sig=[0-9a-f]{16}/, 'the signature is redacted');
    assert.ok(fs.readFileSync(target('pol-glance')).equals(raw), 'the DPU target holds the Glance image');
    await ironic.baremetal('node', 'undeploy', 'pol-glance');
    await ironic.waitForProvisionState('pol-glance', 'available', 60_000);
  });

  it('Ironic renews its temp URL while the copy goes on: a copy that outlives two temp URLs completes', async () => {
    const uuid = await fakeNode('pol-renew');
    // 6 MiB at 128 KiB/s: ~48 s of copying, twice the temp URL's life.
    await ironic.baremetal('node', 'set', 'pol-renew', '--driver-info', `smartnic_bandwidth=${128 * 1024}`, '--instance-info', `image_source=${glance.raw.id}`);
    await ironic.baremetal('node', 'deploy', 'pol-renew');
    await ironic.waitForProvisionState('pol-renew', 'active', 90_000);
    const expiry = (url: string): number => Number(new URL(url).searchParams.get('temp_url_expires'));
    const first = expiry((await api.getDeployment(uuid)).image_url);
    const t0 = Date.now();
    const done = await until('hydration complete', async () => {
      const dep = await api.getDeployment(uuid);
      assert.notEqual(dep.state, 'failed', dep.last_error ?? '');
      return dep.state === 'complete' ? dep : null;
    }, 120_000, 500);
    const took = (Date.now() - t0) / 1000;
    console.log(`      copy took ${took.toFixed(0)} s more after ACTIVE; temp URLs live ${TEMP_URL_SECONDS} s`);
    assert.ok(Date.now() / 1000 > first, 'the first temp URL expired before the copy ended');
    assert.ok(expiry(done.image_url) > first, `the service was given a renewed URL (${done.image_url})`);
    assert.ok(ironic.logLines(uuid).some((l) => /Renewed the Swift temp URL of the image/.test(l)));
    assert.ok(fs.readFileSync(target('pol-renew')).equals(raw), 'the DPU target holds the image');
    await ironic.baremetal('node', 'undeploy', 'pol-renew');
    await ironic.waitForProvisionState('pol-renew', 'available', 60_000);
  });

  it('a qcow2 Glance image deploys through Ironic: image_disk_format qcow2 reaches the agent, which serves the disk it describes', async () => {
    const uuid = await fakeNode('pol-qcow2');
    await ironic.baremetal('node', 'set', 'pol-qcow2', '--instance-info', `image_source=${glance.qcow2.id}`);
    const { node } = await deployToComplete('pol-qcow2', uuid);
    assert.equal(node.instance_info['image_disk_format'], 'qcow2');
    assert.ok(fs.readFileSync(target('pol-qcow2')).equals(qcow2Disk), 'the DPU target holds the raw disk the qcow2 image describes');
    await ironic.baremetal('node', 'undeploy', 'pol-qcow2');
    await ironic.waitForProvisionState('pol-qcow2', 'available', 60_000);
  });

  describe('a checksum is verified, in the algorithm Ironic reads it in', () => {
    const verifiedNode = async (name: string): Promise<string> => {
      const uuid = await fakeNode(name);
      // Verification required: the disk is created only once the whole image matched.
      await ironic.baremetal('node', 'set', name, '--driver-info', 'smartnic_require_verification=true');
      return uuid;
    };

    it('a SHA-256 in image_checksum (64 hex digits) is checked as SHA-256, not as md5', async () => {
      const uuid = await verifiedNode('pol-sum-ok');
      await ironic.baremetal('node', 'set', 'pol-sum-ok', '--instance-info', `image_source=${origin.url}`, '--instance-info', `image_checksum=${sha256(raw)}`);
      await deployToComplete('pol-sum-ok', uuid);
      assert.ok(fs.readFileSync(target('pol-sum-ok')).equals(raw));
      await ironic.baremetal('node', 'undeploy', 'pol-sum-ok');
      await ironic.waitForProvisionState('pol-sum-ok', 'available', 60_000);
    });

    it('a wrong checksum fails the deploy with the mismatch', async () => {
      await verifiedNode('pol-sum-bad');
      const wrong = sha256(Buffer.from('not the image'));
      await ironic.baremetal('node', 'set', 'pol-sum-bad', '--instance-info', `image_source=${origin.url}`, '--instance-info', `image_checksum=${wrong}`);
      await ironic.baremetal('node', 'deploy', 'pol-sum-bad');
      const failed = await ironic.waitForProvisionState('pol-sum-bad', 'deploy failed', 90_000);
      assert.match(failed.last_error!, /DRV_ERR_IMAGE_MISMATCH/);
      assert.match(failed.last_error!, /sha256/);
      await ironic.baremetal('node', 'undeploy', 'pol-sum-bad');
      await ironic.waitForProvisionState('pol-sum-bad', 'available', 60_000);
    });
  });

  describe('boot mode: what Ironic sets reaches the BMC (ipmi_sim)', () => {
    let bmc: VirtualBmc;

    before(async () => {
      bmc = new VirtualBmc({ dir: path.join(dir, 'bmc'), agentUrl: agent.url, agentToken: TOKEN, target: target('pol-ipmi') });
      await bmc.start();
    });
    after(async () => {
      await bmc?.stop();
    });

    async function deployAndBootFlags(whileActive?: () => Promise<void>): Promise<{ node: IronicNode; flags: ReturnType<IpmitoolRecorder['bootFlags']> }> {
      // Undeploy empties instance_info: set it for every deploy.
      await ironic.baremetal('node', 'set', 'pol-ipmi', ...imageInfoArgs(origin.url, rawFile));
      const before = ipmitool.bootFlags().length;
      await ironic.baremetal('node', 'deploy', 'pol-ipmi');
      const node = await ironic.waitForProvisionState('pol-ipmi', 'active', 90_000);
      const flags = ipmitool.bootFlags().slice(before);
      await whileActive?.();
      await ironic.baremetal('node', 'undeploy', 'pol-ipmi');
      await ironic.waitForProvisionState('pol-ipmi', 'available', 90_000);
      return { node, flags };
    }

    it('default: UEFI ([deploy]default_boot_mode), persistent disk with the EFI bit; capabilities boot_mode:bios: legacy', async () => {
      await availableNode('pol-ipmi', ['--driver', 'smartnic-ipmi', ...Object.entries({ ...bmc.driverInfo(), smartnic_agent_url: agent.url, smartnic_target: target('pol-ipmi') }).flatMap(([k, v]) => ['--driver-info', `${k}=${v}`])]);

      const uefi = await deployAndBootFlags();
      assert.equal(uefi.node.driver_internal_info['deploy_boot_mode'], 'uefi');
      assert.deepEqual(uefi.flags.at(-1), { mode: 'uefi', device: 'disk', persistent: true }, JSON.stringify(uefi.flags));

      await ironic.baremetal('node', 'set', 'pol-ipmi', '--property', 'capabilities=boot_mode:bios');
      const bios = await deployAndBootFlags(async () => {
        // Rescue needs a ramdisk this interface never boots: the hardware type offers no-rescue only.
        const rescue = await ironic.baremetalResult('node', 'rescue', 'pol-ipmi', '--rescue-password', 'secret');
        assert.notEqual(rescue.code, 0);
        assert.match(rescue.stderr, /Driver smartnic-ipmi does not support rescue/);
        assert.equal((await ironic.node('pol-ipmi')).provision_state, 'active');
      });
      // (sync_boot_mode records deploy_boot_mode only when it picked the mode itself.)
      assert.deepEqual(bios.flags.at(-1), { mode: 'legacy', device: 'disk', persistent: true }, JSON.stringify(bios.flags));
      // ipmi_sim's chassis program saw the same "default" (disk) both times: the mode is not passed on.
      assert.equal((bmc.chassisLog().match(/set boot default/g) ?? []).length >= 2, true, bmc.chassisLog());
    });
  });
});

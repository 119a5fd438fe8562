import assert from 'node:assert/strict';
import { resolveDriverConfig } from '../../driver/src/config.js';
import { DriverError } from '../../driver/src/errors.js';
import { describeImageRef, infoDigest, parseImageSource, resolveImage } from '../../driver/src/image.js';
import { expectedDigest, manifestKey } from '../../driver/src/manifests.js';
import { containerFor, objectOfUrl, swiftEndpoint, type SwiftOptions, tempUrl, tempUrlSignature } from '../../driver/src/swift.js';

const ID = '2f0a3c1e-9b7d-4c55-8e21-0d6f4a7b9c10';

function config(glance: Record<string, unknown> = {}) {
  return resolveDriverConfig({ object: { auth: { disabled: true }, glance } });
}

function swift(o: Partial<SwiftOptions> = {}): SwiftOptions {
  return { ...config({ swift_endpoint_url: 'http://swift:8080/v1/AUTH_proj', swift_temp_url_key: 'k', ...o }).glance };
}

describe('image sources (driver/src/image.ts, swift.ts)', () => {
  it("parses Glance ids as Ironic does: bare UUID (any case, dashes optional) or glance://…/UUID", () => {
    const c = config({ url: 'http://glance:9292' });
    for (const src of [ID, ID.toUpperCase(), ID.replace(/-/g, ''), `glance://${ID}`, `glance://glance.example:9292/${ID}`]) {
      assert.deepEqual(parseImageSource({ image_source: src }, c), { kind: 'glance', id: ID }, src);
    }
    assert.equal(describeImageRef({ kind: 'glance', id: ID }), `glance://${ID}`);
    assert.throws(() => parseImageSource({ image_source: 'glance://2f0a' }, c), /does not end in a Glance image id/);
    assert.throws(() => parseImageSource({ image_source: ID }, config()), (e: unknown) => e instanceof DriverError && e.code === 'DRV_ERR_IMAGE_SOURCE' && /no glance\.url configured/.test(e.message));
  });

  it('parses swift://container/object and unsigned object URLs of the configured account', () => {
    const c = config({ swift_endpoint_url: 'http://swift:8080/v1/AUTH_proj', swift_temp_url_key: 'k' });
    assert.deepEqual(parseImageSource({ image_source: 'swift://images/a/b%20c.img' }, c), { kind: 'swift', container: 'images', object: 'a/b c.img' });
    assert.deepEqual(parseImageSource({ image_source: 'http://swift:8080/v1/AUTH_proj/images/x.img' }, c), { kind: 'swift', container: 'images', object: 'x.img' });
    // Signed already, another account, another host: plain http, read as given.
    for (const u of ['http://swift:8080/v1/AUTH_proj/images/x.img?temp_url_sig=a&temp_url_expires=1', 'http://swift:8080/v1/AUTH_other/images/x.img', 'http://web/x.img']) {
      assert.equal(parseImageSource({ image_source: u }, c).kind, 'http', u);
    }
    assert.throws(() => parseImageSource({ image_source: 'swift://images' }, c), /is not swift:\/\/container\/object/);
    assert.throws(() => parseImageSource({ image_source: 'swift://c/o' }, config()), /no glance\.swift_endpoint_url configured/);
    assert.throws(() => parseImageSource({ image_source: 'nfs://x/y' }, c), /scheme "nfs:" is not supported/);
  });

  it("names Glance's container like glance_store: N id characters, dashes not counted", () => {
    const o = swift();
    assert.equal(containerFor(ID, o), 'glance');
    assert.equal(containerFor(ID, { ...o, swift_store_multiple_containers_seed: 3 }), 'glance_2f0');
    assert.equal(containerFor(ID, { ...o, swift_store_multiple_containers_seed: 10 }), 'glance_2f0a3c1e-9b');
    assert.equal(containerFor(ID.toUpperCase(), { ...o, swift_store_multiple_containers_seed: 1 }), 'glance_2');
  });

  it('strips /v1/<prefix>_x from the endpoint and takes the account from it unless configured', () => {
    assert.deepEqual(swiftEndpoint(swift()), { base: 'http://swift:8080', account: 'AUTH_proj' });
    assert.deepEqual(swiftEndpoint(swift({ swift_endpoint_url: 'http://swift:8080/', swift_account: 'AUTH_x' })), { base: 'http://swift:8080', account: 'AUTH_x' });
    assert.deepEqual(swiftEndpoint(swift({ swift_endpoint_url: 'https://s/v1/SVC_p/', swift_account_prefix: 'SVC' })), { base: 'https://s', account: 'SVC_p' });
    assert.throws(() => swiftEndpoint(swift({ swift_endpoint_url: 'http://swift:8080' })), /glance\.swift_account/);
  });

  it("builds Ironic's temp URL: HMAC-SHA256 of GET, expiry and the decoded path; the URL percent-encoded", () => {
    const now = 1_700_000_000_000;
    const t = tempUrl(swift({ swift_temp_url_duration: 1200 }), { container: 'glance', object: ID }, now);
    assert.equal(t.expires, 1_700_001_200);
    assert.equal(t.path, `/v1/AUTH_proj/glance/${ID}`);
    assert.equal(t.url, `http://swift:8080/v1/AUTH_proj/glance/${ID}?temp_url_sig=${tempUrlSignature('k', 'GET', 1_700_001_200, t.path)}&temp_url_expires=1700001200`);
    // python-swiftclient: generate_temp_url('/v1/AUTH_account/c/o', 1400003600, 'secret', 'GET', absolute=True)
    assert.equal(tempUrlSignature('secret', 'GET', 1400003600, '/v1/AUTH_account/c/o'), '5c38d018419fac3324ad58a354e225d507dd58b6088754180238fcf47254bb58');
    const spaced = tempUrl(swift(), { container: 'images', object: 'a/b c.img' }, now);
    assert.match(spaced.url, /^http:\/\/swift:8080\/v1\/AUTH_proj\/images\/a\/b%20c\.img\?temp_url_sig=[0-9a-f]{64}&temp_url_expires=\d+$/);
    assert.equal(spaced.path, '/v1/AUTH_proj/images/a/b c.img');
    assert.deepEqual(objectOfUrl(swift(), new URL(spaced.url.split('?')[0]!)), { container: 'images', object: 'a/b c.img' });
  });

  it("reads instance_info's digest as Ironic does: the hash pair first, else image_checksum by `algo:` or by its length", () => {
    const md5 = 'ab'.repeat(16);
    const sha256 = 'cd'.repeat(32);
    const sha512 = 'ef'.repeat(64);
    const src = 'http://web/x.raw';
    assert.deepEqual(infoDigest({ image_source: src, image_checksum: md5 }), { algo: 'md5', value: md5 }, 'md5: the legacy meaning');
    assert.deepEqual(infoDigest({ image_source: src, image_checksum: sha256 }), { algo: 'sha256', value: sha256 }, '64 hex digits are sha256, not md5');
    assert.deepEqual(infoDigest({ image_source: src, image_checksum: sha512 }), { algo: 'sha512', value: sha512 });
    assert.deepEqual(infoDigest({ image_source: src, image_checksum: `SHA256:${sha256}` }), { algo: 'sha256', value: sha256 });
    assert.deepEqual(infoDigest({ image_source: src, image_checksum: md5, image_os_hash_algo: 'SHA512', image_os_hash_value: sha512 }), { algo: 'sha512', value: sha512 });
    assert.equal(infoDigest({ image_source: src }), null);
    assert.throws(() => infoDigest({ image_source: src, image_checksum: 'https://web/SHA256SUMS' }), (e: unknown) => e instanceof DriverError && e.field === 'instance_info.image_checksum' && /does not fetch checksum files/.test(e.message));
  });

  it('an http image is named, and its manifest keyed and checked, by that digest; qcow2 is served decoded', async () => {
    const sha256 = 'cd'.repeat(32);
    const info = { image_source: 'http://web/x.qcow2', image_checksum: sha256, image_disk_format: 'qcow2' as const };
    const image = await resolveImage(info, config());
    assert.equal(image.identity, `image;sha256=${sha256}`);
    assert.equal(image.format, 'qcow2');
    assert.deepEqual(expectedDigest(image, info), { algo: 'sha256', value: sha256 });
    assert.equal(manifestKey(image, info, 1 << 20), `v2;qcow2;1048576;sha256=${sha256}`);
    await assert.rejects(resolveImage({ image_source: 'http://web/x', image_disk_format: 'vmdk' as never }, config()), /disk_format "vmdk"; the DPU serves raw and qcow2 images/);
  });
});

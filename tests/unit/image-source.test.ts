import assert from 'node:assert/strict';
import { resolveDriverConfig } from '../../driver/src/config.js';
import { DriverError } from '../../driver/src/errors.js';
import { describeImageRef, parseImageSource } from '../../driver/src/image.js';
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
});

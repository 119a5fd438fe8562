/**
 * The dashboard in a real browser (Debian's Chromium driven by playwright-core): a
 * deployment's region map fills in while its disk hydrates, and the page shows the
 * deployment's state and progress. A screenshot lands in docs/dashboard.png.
 */
import assert from 'node:assert/strict';
import path from 'node:path';
import { type Browser, chromium } from 'playwright-core';
import { DriverClient } from '../../openapi/clients/driver-client.js';
import { makeImage, tempDir } from '../helpers/agent.js';
import { TestOrigin } from '../helpers/origin.js';
import { RedisServer } from '../helpers/redis.js';
import { agentDaemon, driverService, type ServiceProcess, TOKEN, until } from '../helpers/services.js';

const MiB = 1 << 20;
// The README's picture is refreshed on request (DASHBOARD_SCREENSHOT=docs/dashboard.png),
// so an ordinary test run leaves the tree clean.
const SCREENSHOT = process.env['DASHBOARD_SCREENSHOT'] ? path.resolve(process.env['DASHBOARD_SCREENSHOT']) : null;

describe('dashboard in headless Chromium', function () {
  this.timeout(120_000);
  let dir: string;
  let cleanup: () => void;
  let origin: TestOrigin;
  let redis: RedisServer;
  let agent: ServiceProcess;
  let driver: ServiceProcess;
  let browser: Browser | null = null;

  before(async () => {
    ({ dir, cleanup } = tempDir('dashboard'));
    makeImage(path.join(dir, 'image.raw'), 256 * MiB, 9);
    origin = new TestOrigin({ file: path.join(dir, 'image.raw'), rate: 24 * MiB });
    await origin.start();
    redis = new RedisServer(path.join(dir, 'redis'));
    await redis.start();
    agent = await agentDaemon({ dir: path.join(dir, 'agent') });
    await agent.start();
    driver = await driverService({ dir, redisUrl: redis.url });
    await driver.start();
    browser = await chromium.launch({
      executablePath: '/usr/bin/chromium',
      args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
    });
  });
  after(async () => {
    await browser?.close();
    await driver.stop();
    await agent.stop();
    await redis.stop();
    await origin.stop();
    cleanup();
  });

  it('shows a deployment and its region map filling in', async () => {
    const api = new DriverClient({ baseUrl: driver.url, token: TOKEN });
    await api.createDeployment({
      node_uuid: 'node-dash',
      instance_info: { image_source: origin.url },
      driver_info: { smartnic_agent_url: agent.url, smartnic_target: path.join(dir, 'agent', 'targets', 'node-dash.raw') },
    });
    const page = await browser!.newPage({ viewport: { width: 1200, height: 520 } });
    // The token travels in the fragment: never sent to the server, never in its logs.
    await page.goto(`${driver.url}/dashboard/#token=${TOKEN}`);
    await page.waitForSelector('#dep-node-dash .state.ready', { timeout: 30_000 });
    const canvas = page.locator('#dep-node-dash canvas.regions');
    const localAt = async (): Promise<number> => Number(await canvas.getAttribute('data-local'));
    const first = await until('region map drawn', async () => (await canvas.getAttribute('data-count')) ? localAt() : null, 20_000).catch(() => 0);
    const later = await until('more regions local', async () => {
      const n = await localAt();
      return n > first && n >= 64 ? n : null;
    }, 30_000);
    assert.ok(later > first, `region map filled in: ${first} → ${later} local`);
    assert.equal(await page.locator('#dep-node-dash .node').textContent(), 'node-dash');
    assert.match((await page.locator('#dep-node-dash .local').textContent()) ?? '', /\/256 regions/);
    // A plain URL with no digest names no image content: no boot profile to keep or replay.
    assert.equal(await page.locator('#dep-node-dash .profile').textContent(), 'off');
    assert.equal(await page.locator('#queues').getAttribute('href'), '/queues');
    const shot = await page.screenshot(SCREENSHOT ? { path: SCREENSHOT } : {});
    assert.ok(shot.length > 10_000, 'the page rendered');
    // The token is not left in the address bar.
    assert.ok(!page.url().includes(TOKEN));
    await page.close();
  });

  it('asks for a token when it has none, and refuses a wrong one', async () => {
    const page = await browser!.newPage();
    await page.goto(`${driver.url}/dashboard/`);
    await page.waitForSelector('#login:not([hidden])');
    await page.fill('#token', 'not-the-token-at-all');
    await page.click('#login button');
    await page.waitForSelector('text=That token is not accepted.');
    await page.fill('#token', TOKEN);
    await page.click('#login button');
    await page.waitForSelector('#dep-node-dash');
    await page.close();
  });
});

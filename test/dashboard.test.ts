// The dashboard in a real headless Chromium (Debian's chromium, driven by playwright-core) against a
// real 3-agent cluster: log in, see three nodes, crash a node from the CLI and watch its services
// move on the page, move a service from the page. Screenshots go to test-artifacts/.
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { BrowserContext, Page } from 'playwright-core';
import { TestCluster, repo } from './helpers/cluster.js';
import { loadClusterConfig } from '../src/config/schema.js';
import { startApi, type ApiServer } from '../src/api/server.js';
import { createToken } from '../src/api/auth.js';

const chromiumPath = '/usr/bin/chromium';
const artifacts = join(repo, 'test-artifacts');
const chromiumFlags = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];
const pageWaitMs = 30000;
let port = 19600 + (process.pid % 300) * 3;

describe('dashboard in headless Chromium', { timeout: 150_000 }, () => {
  if (!existsSync(chromiumPath)) {
    it('needs chromium', (t) =>
      t.skip(`needs ${chromiumPath}: apt-get install chromium (scripts/setup.sh does)`));
    return;
  }
  const c = new TestCluster({
    nodes: [{ name: 'node1' }, { name: 'node2' }, { name: 'node3' }],
    leaseTtlMs: 2000,
  });
  let api: ApiServer;
  let browser: BrowserContext;
  let page: Page;
  let token = '';
  const userDataDir = mkdtempSync(join(tmpdir(), 'corral-chromium-'));

  before(async () => {
    mkdirSync(artifacts, { recursive: true });
    await c.start();
    for (const id of ['web', 'api', 'cache']) await c.defineService(id, port++);
    for (const id of ['web', 'api', 'cache']) await c.waitStarted(id);
    token = (await createToken(c.store, 'test', 'browser-admin', 'admin', Date.now())).token;
    api = await startApi({
      store: c.store,
      config: loadClusterConfig(c.configPath),
      configPath: c.configPath,
      stateRoot: c.stateRoot,
      listen: '127.0.0.1:0',
      log: () => undefined,
    });
    const { chromium } = await import('playwright-core');
    browser = await chromium.launchPersistentContext(userDataDir, {
      executablePath: chromiumPath,
      headless: true,
      args: chromiumFlags,
      viewport: { width: 1400, height: 900 },
    });
    page = browser.pages()[0] ?? (await browser.newPage());
  });

  after(async () => {
    await browser?.close().catch(() => undefined);
    await api?.close().catch(() => undefined);
    await c.stop();
    rmSync(userDataDir, { recursive: true, force: true });
  });

  it('logs in with a token and shows three nodes and the services', async () => {
    await page.goto(api.url + '/');
    await page.fill('#token-input', 'crl_wrongwrongwrongwrongwrongwrongwrong');
    await page.click('#login-form button');
    await page.waitForSelector('text=unknown or revoked token', { timeout: pageWaitMs });
    await page.fill('#token-input', token);
    await page.click('#login-form button');
    await page.waitForSelector('.node[data-node="node3"]', { timeout: pageWaitMs });
    assert.equal(await page.locator('.node').count(), 3);
    await page.waitForSelector('#live.on', { timeout: pageWaitMs });
    await page.waitForSelector('tr[data-resource="cache"][data-state="started"]', { timeout: pageWaitMs });
    await page.screenshot({ path: join(artifacts, 'dashboard-1-overview.png'), fullPage: true });
  });

  it('shows services moving off a node crashed from the CLI, without a reload', async () => {
    const victim = (await c.resourceOn('web')).node!;
    const onVictim = (await c.snapshot()).resources;
    const moved = [...onVictim.values()].filter((r) => r.rec?.node === victim).map((r) => r.id);
    await page.evaluate(() => ((window as unknown as { __noReload: boolean }).__noReload = true));
    const r = c.cli('node', 'crash', victim, '--state-root', c.stateRoot);
    assert.equal(r.code, 0, r.stderr);
    await page.waitForSelector(`.node[data-node="${victim}"]:not([data-state="online"])`, {
      timeout: pageWaitMs,
    });
    await page.screenshot({ path: join(artifacts, 'dashboard-2-node-lost.png'), fullPage: true });
    for (const id of moved)
      await page.waitForSelector(
        `tr[data-resource="${id}"][data-state="started"]:not([data-node="${victim}"]):not([data-node=""])`,
        { timeout: pageWaitMs },
      );
    assert.equal(
      await page.evaluate(() => (window as unknown as { __noReload?: boolean }).__noReload),
      true,
      'page was not reloaded',
    );
    await page.waitForSelector(`.feed li:has-text("${victim}")`, { timeout: pageWaitMs });
    await page.screenshot({ path: join(artifacts, 'dashboard-3-recovered.png'), fullPage: true });
  });

  it('moves a service from the page (with a confirmation) and shows it on its new node', async () => {
    const s = await c.snapshot();
    const online = [...s.nodes.values()].filter((n) => n.status?.state === 'online').map((n) => n.name);
    const from = (await c.resourceOn('api')).node!;
    const target = online.find((n) => n !== from)!;
    await page.click('tr[data-resource="api"] button[data-act="move"]');
    await page.waitForSelector('#confirm[open]', { timeout: pageWaitMs });
    await page.selectOption('#target-node', target);
    await page.screenshot({ path: join(artifacts, 'dashboard-4-move-dialog.png') });
    await page.click('#confirm-ok');
    await page.waitForSelector(`tr[data-resource="api"][data-state="started"][data-node="${target}"]`, {
      timeout: pageWaitMs,
    });
    const evs = await c.events();
    assert.ok(
      evs.some((e) => e.object === 'api' && e.action === 'move' && e.by === 'token:browser-admin'),
      'move event names the token',
    );
    await page.click('tr[data-resource="api"] a');
    await page.waitForSelector('[data-resource-page="api"]', { timeout: pageWaitMs });
    await page.waitForSelector('text=move to', { timeout: pageWaitMs });
    await page.screenshot({ path: join(artifacts, 'dashboard-5-resource-page.png'), fullPage: true });
    await page.click(`a[href="#/node/${target}"]`);
    await page.waitForSelector(`h2:has-text("Node ${target}")`, { timeout: pageWaitMs });
    await page.screenshot({ path: join(artifacts, 'dashboard-6-node-page.png'), fullPage: true });
  });
});

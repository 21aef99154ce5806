// The live todo page dcrf-demo serves at `/`, in Debian's Chromium driven by playwright-core:
// every control, two pages seeing each other's changes, a server restart with a third client
// writing, and a screenshot (artifacts/todo-page.png).
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';

import { chromium } from 'playwright-core';

// The TypeScript client's test helpers (start dcrf-demo, connect the client); the client
// suite builds them first (`npm test` in clients/typescript).
import {
  BACKEND,
  connectClient,
  eventually,
  persistentDatabase,
  startServer,
  unique,
} from '../../../clients/typescript/test/support/harness.js';

const CHROMIUM = process.env.DCRF_TEST_CHROMIUM || '/usr/bin/chromium';
const ARTIFACTS = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', 'artifacts');
const NO_BROWSER = fs.existsSync(CHROMIUM) ? false : `needs Chromium at ${CHROMIUM} (apt-get install chromium)`;

/** Every todo, by id, read with `list` on a fresh connection. */
async function allTodos(server) {
  const client = connectClient(server.ws('/ws/todos/'));
  try {
    const page = await client.stream().list({ ordering: 'id', limit: 1000 });
    return page.results;
  } finally {
    client.close();
  }
}

/** What a page shows: each row's title and checkbox, in order. */
function shown(page) {
  return page.getByTestId('todo-item').evaluateAll((rows) =>
    rows.map((row) => ({
      title: row.textContent,
      done: row.querySelector('[data-testid="todo-toggle"]').checked,
    })),
  );
}

/** Waits until `page` shows exactly the server's todos. */
async function converged(page, server, what, ms = 10000) {
  await eventually(async () => {
    const expected = (await allTodos(server)).map((t) => ({ title: t.title, done: t.done }));
    assert.deepEqual(await shown(page), expected);
    return true;
  }, what, ms);
}

describe(`the todo page (${BACKEND})`, { skip: NO_BROWSER }, () => {
  let browser;
  const servers = [];
  const clients = [];
  before(async () => {
    browser = await chromium.launch({ executablePath: CHROMIUM, headless: true });
  });
  after(async () => {
    for (const c of clients.splice(0)) c.close();
    for (const s of servers.splice(0)) await s.stop();
    await browser?.close();
  });

  /** A new page on `server`, once it says `live`. */
  async function openPage(server) {
    const page = await browser.newPage({ viewport: { width: 900, height: 640 } });
    const errors = [];
    page.on('pageerror', (e) => errors.push(e));
    page.errors = errors;
    await page.goto(`${server.http}/`);
    await page.getByTestId('connection-status').filter({ hasText: /^live$/ }).waitFor({ timeout: 10000 });
    return page;
  }

  test('add, toggle, rename, delete and mark all done, live', async () => {
    const server = await startServer({ args: ['--seed', '2'] });
    servers.push(server);
    const page = await openPage(server);
    const rows = page.getByTestId('todo-item');
    await converged(page, server, 'the page to show the seeded todos');
    const initial = await rows.allTextContents();
    assert.ok(initial.includes('Todo 1') && initial.includes('Todo 2'), initial.join(', '));

    const title = unique('Buy milk');
    await page.getByTestId('new-todo').fill(title);
    await page.getByTestId('new-todo').press('Enter');
    const row = rows.filter({ hasText: title });
    await row.waitFor();
    assert.equal(await page.getByTestId('new-todo').inputValue(), '', 'the input is cleared');
    assert.equal(await row.textContent(), title);

    await row.getByTestId('todo-toggle').check();
    await eventually(async () => (await allTodos(server)).find((t) => t.title === title)?.done === true, 'the toggle to be stored');
    await converged(page, server, 'the page to show the toggle');

    await row.getByTestId('todo-title').dblclick();
    const renamed = `${title} (oat)`;
    await row.getByTestId('todo-edit').fill(renamed);
    await row.getByTestId('todo-edit').press('Enter');
    await rows.filter({ hasText: renamed }).waitFor();
    assert.ok((await allTodos(server)).some((t) => t.title === renamed));

    await page.getByTestId('mark-all-done').click();
    await eventually(async () => (await allTodos(server)).every((t) => t.done), 'every todo done');
    await converged(page, server, 'the page to show every todo done');

    await rows.filter({ hasText: renamed }).getByTestId('todo-delete').click();
    await rows.filter({ hasText: renamed }).waitFor({ state: 'detached' });
    assert.ok(!(await allTodos(server)).some((t) => t.title === renamed));
    await converged(page, server, 'the page to match after the delete');
    assert.deepEqual(page.errors, []);
    await page.close();
  });

  test('two pages on one server see each other\'s changes within a second', async () => {
    const server = await startServer();
    servers.push(server);
    const [left, right] = [await openPage(server), await openPage(server)];
    const title = unique('shared');
    const started = Date.now();
    await left.getByTestId('new-todo').fill(title);
    await left.getByTestId('new-todo').press('Enter');
    await right.getByTestId('todo-item').filter({ hasText: title }).waitFor({ timeout: 1000 });
    await right.getByTestId('todo-item').filter({ hasText: title }).getByTestId('todo-toggle').check();
    await left
      .getByTestId('todo-item')
      .filter({ hasText: title })
      .locator('[data-testid="todo-toggle"]:checked')
      .waitFor({ timeout: 1000 });
    await left.getByTestId('todo-item').filter({ hasText: title }).getByTestId('todo-delete').click();
    await right.getByTestId('todo-item').filter({ hasText: title }).waitFor({ state: 'detached', timeout: 1000 });
    assert.ok(Date.now() - started < 5000);
    await left.close();
    await right.close();
  });

  test('server killed and restarted while a third client writes: both pages converge without reload', async () => {
    const database = persistentDatabase();
    let server = await startServer({ database });
    servers.push(server);
    const port = server.port;
    const pages = [await openPage(server), await openPage(server)];
    const writer = connectClient(server.ws('/ws'));
    clients.push(writer);
    const todos = writer.stream('todos');
    const kept = await todos.create({ title: unique('before the crash') });
    const gone = await todos.create({ title: unique('deleted meanwhile') });
    for (const page of pages) await page.getByTestId('todo-item').filter({ hasText: gone.title }).waitFor();
    const navigations = pages.map((page) => {
      let n = 0;
      page.on('framenavigated', () => {
        n += 1;
      });
      return () => n;
    });

    await server.kill();
    servers.splice(servers.indexOf(server), 1);
    for (const page of pages) {
      await page.getByTestId('connection-status').filter({ hasText: /^(?!live$)/ }).waitFor({ timeout: 5000 });
    }
    await eventually(() => writer.state !== 'open', 'the writer to notice the crash');
    // The third client's writes wait for the server and go through once it is back.
    const writes = Promise.all([
      todos.create({ title: unique('written during the restart') }),
      todos.patch(kept.id, { done: true }),
      todos.delete(gone.id),
    ]);
    server = await startServer({ database, port });
    servers.push(server);
    const [added] = await writes;
    const after = await todos.create({ title: unique('after the restart') });

    for (const page of pages) {
      await page.getByTestId('connection-status').filter({ hasText: /^live$/ }).waitFor({ timeout: 10000 });
      await converged(page, server, 'a page to converge after the restart');
      const titles = await page.getByTestId('todo-item').allTextContents();
      assert.ok(titles.includes(added.title) && titles.includes(after.title) && !titles.includes(gone.title), titles.join(', '));
    }
    assert.deepEqual(navigations.map((n) => n()), [0, 0], 'no page reloaded');
    for (const page of pages) assert.deepEqual(page.errors, []);

    fs.mkdirSync(ARTIFACTS, { recursive: true });
    const shot = path.join(ARTIFACTS, 'todo-page.png');
    await pages[0].screenshot({ path: shot, fullPage: true });
    assert.ok(fs.statSync(shot).size > 1000);
    for (const page of pages) await page.close();
  });
});

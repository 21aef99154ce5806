'use strict';
// Smoke test of the `todos` stream: a paginated list, create, and `subscribe_to_all` events.

const assert = require('node:assert/strict');
const { after, afterEach, before, beforeEach, describe, it } = require('node:test');

const {
  FRESH_DATABASE,
  closeClients,
  connectClient,
  listenFrames,
  rejectionOf,
  startServer,
  uniqueName,
  withTimeout,
} = require('../support/harness');

const STREAM = 'todos';

describe('todos stream', () => {
  let server;
  let client;
  const clients = [];

  before(async () => {
    server = await startServer();
  });
  after(async () => {
    closeClients(clients);
    if (server) await server.stop();
  });
  beforeEach(async () => {
    client = await connectClient(server);
    clients.push(client);
  });
  afterEach(() => closeClients(clients));

  it('lists a page: {count, results, limit, offset}', async () => {
    const page = await withTimeout(client.list(STREAM), 'list reply');
    if (FRESH_DATABASE) {
      assert.deepEqual(page, { count: 0, results: [], limit: 100, offset: 0 });
    } else {
      assert.deepEqual(Object.keys(page).sort(), ['count', 'limit', 'offset', 'results']);
      assert.equal(typeof page.count, 'number');
      assert.ok(Array.isArray(page.results));
      assert.equal(page.limit, 100);
      assert.equal(page.offset, 0);
    }
  });

  it('creates a todo with defaults and lists it', async () => {
    const before = await withTimeout(client.list(STREAM), 'list reply (before)');
    const title = uniqueName('todo');
    const todo = await withTimeout(client.create(STREAM, { title }), 'create reply');
    assert.equal(typeof todo.id, 'number');
    assert.deepEqual(todo, { id: todo.id, title, done: false, owner: '' });
    assert.deepEqual(await withTimeout(client.retrieve(STREAM, todo.id), 'retrieve reply'), todo);

    // DCRF reads pagination and ordering from the payload itself, not from `data`.
    const page = await withTimeout(
      client.request(STREAM, { action: 'list', limit: 5, ordering: '-id' }),
      'list reply (after)',
    );
    assert.equal(page.limit, 5);
    assert.deepEqual(page.results[0], todo, 'newest todo is not first with ordering -id');
    assert.deepEqual(
      page.results.find((t) => t.id === todo.id),
      todo,
    );
    if (FRESH_DATABASE) assert.equal(page.count, before.count + 1);
  });

  it('rejects a todo without a title with 400', async () => {
    const rejection = await rejectionOf(client.create(STREAM, { done: true }), 'create rejection');
    assert.equal(rejection.response_status, 400);
    assert.deepEqual(rejection.errors, [{ title: ['This field is required.'] }]);
  });

  it('pushes create, update and delete events to subscribe_to_all', async () => {
    const rid = `all-${uniqueName()}`;
    const frames = listenFrames(client, { stream: STREAM, payload: { request_id: rid } });
    const subscribed = await withTimeout(
      client.request(STREAM, { action: 'subscribe_to_all' }, rid),
      'subscribe_to_all reply',
    );
    assert.deepEqual(subscribed, { subscribed: true });
    const reply = await frames.next('subscribe_to_all reply frame');
    assert.equal(reply.payload.response_status, 201);

    const title = uniqueName('todo');
    const todo = await withTimeout(client.create(STREAM, { title, owner: 'ann' }), 'create');
    const mine = (action) => (f) => f.payload.action === action && f.payload.data.id === todo.id;
    const created = await frames.take(mine('create'), 'create event');
    assert.deepEqual(created.payload, {
      errors: [],
      data: todo,
      action: 'create',
      response_status: 200,
      request_id: rid,
    });

    await withTimeout(client.patch(STREAM, todo.id, { done: true }), 'patch reply');
    const updated = await frames.take(mine('update'), 'update event');
    assert.deepEqual(updated.payload.data, { ...todo, done: true });

    await withTimeout(client.delete(STREAM, todo.id), 'delete reply');
    const deleted = await frames.take(mine('delete'), 'delete event');
    assert.equal(deleted.payload.data.id, todo.id);

    const stopped = await withTimeout(
      client.request(STREAM, { action: 'unsubscribe_from_all' }, rid),
      'unsubscribe_from_all reply',
    );
    assert.deepEqual(stopped, { subscribed: false });
  });

  it('instance subscriptions work on todos (pk field "id")', async () => {
    const todo = await withTimeout(client.create(STREAM, { title: uniqueName('todo') }), 'create');
    const events = [];
    let resolveEvent;
    const event = new Promise((resolve) => {
      resolveEvent = resolve;
    });
    const idClient = await connectClient(server, { pkField: 'id' });
    clients.push(idClient);
    await withTimeout(
      idClient.subscribe(STREAM, todo.id, (data, action) => {
        events.push([data, action]);
        resolveEvent();
      }),
      'subscribe reply',
    );
    await withTimeout(client.patch(STREAM, todo.id, { owner: 'bob' }), 'patch reply');
    await withTimeout(event, 'update event');
    assert.deepEqual(events[0], [{ ...todo, owner: 'bob' }, 'update']);
  });
});

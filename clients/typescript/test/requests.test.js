// Requests: promises, DCRF's frames and request ids, typed errors, timeouts, multiplexed
// streams, and requests made before the socket is open.
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import { WebSocketServer } from 'ws';

import { ConnectionError, DcrfError, RequestError, TimeoutError, connect } from '../dist/index.js';
import { BACKEND, cleanup, connectClient, rejection, startServer, unique } from './support/harness.js';

const UUID4 = /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/;

describe(`requests (${BACKEND})`, () => {
  const clients = [];
  const servers = [];
  let server;
  before(async () => {
    server = await startServer();
    servers.push(server);
  });
  after(() => cleanup(clients, servers));

  test('model actions on a plain consumer endpoint send DCRF frames and resolve with data', async () => {
    const client = connectClient(server.ws('/ws/todos/'));
    clients.push(client);
    const todos = client.stream();
    const owner = unique('crud');
    const created = await todos.create({ title: 'write tests', owner });
    assert.deepEqual(created, { id: created.id, title: 'write tests', done: false, owner });
    assert.deepEqual(await todos.retrieve(created.id), created);
    assert.deepEqual(await todos.patch(created.id, { done: true }), { ...created, done: true });
    assert.deepEqual(await todos.update(created.id, { title: 'rewritten', done: false, owner }), {
      ...created,
      title: 'rewritten',
    });
    const page = await todos.list({ filters: { owner } });
    assert.deepEqual(page, {
      count: 1,
      results: [{ ...created, title: 'rewritten', done: false }],
      limit: 100,
      offset: 0,
    });
    assert.equal(await todos.delete(created.id), undefined);

    const [create, retrieve, patch, update, list, del] = client.wire.sent;
    assert.match(create.request_id, UUID4);
    assert.deepEqual(create, { action: 'create', request_id: create.request_id, data: { title: 'write tests', owner } });
    assert.deepEqual(retrieve, { action: 'retrieve', request_id: retrieve.request_id, pk: created.id });
    assert.deepEqual(patch, { action: 'patch', request_id: patch.request_id, pk: created.id, data: { done: true } });
    assert.deepEqual(update, {
      action: 'update',
      request_id: update.request_id,
      pk: created.id,
      data: { title: 'rewritten', done: false, owner },
    });
    assert.deepEqual(list, { action: 'list', request_id: list.request_id, filters: { owner } });
    assert.deepEqual(del, { action: 'delete', request_id: del.request_id, pk: created.id });
    const ids = client.wire.sent.map((f) => f.request_id);
    assert.equal(new Set(ids).size, ids.length, 'every request has its own id');
    assert.deepEqual(client.wire.received.at(-1), {
      errors: [],
      data: null,
      action: 'delete',
      response_status: 204,
      request_id: del.request_id,
    });
  });

  test('errors reject with RequestError carrying response_status and errors', async () => {
    const client = connectClient(server.ws('/ws/todos/'));
    clients.push(client);
    const todos = client.stream();

    const invalid = await rejection(todos.create({ owner: 'x' }));
    assert.ok(invalid instanceof RequestError && invalid instanceof DcrfError);
    assert.equal(invalid.response_status, 400);
    assert.deepEqual(invalid.errors, [{ title: ['This field is required.'] }]);
    assert.equal(invalid.action, 'create');
    assert.equal(invalid.request_id, client.wire.sent[0].request_id);

    const missing = await rejection(todos.retrieve(2147483000));
    assert.equal(missing.response_status, 404);
    assert.deepEqual(missing.errors, ['Not found']);

    const unknown = await rejection(todos.request('nope'));
    assert.equal(unknown.response_status, 405);
    assert.deepEqual(unknown.errors, ['Method "nope" not allowed.']);
    assert.deepEqual(client.wire.received.at(-1), {
      errors: ['Method "nope" not allowed.'],
      data: null,
      action: 'nope',
      response_status: 405,
      request_id: client.wire.sent.at(-1).request_id,
    });
  });

  test('a request id of any JSON type is sent and matched verbatim', async () => {
    const client = connectClient(server.ws('/ws/echo/'));
    clients.push(client);
    const echo = client.stream();
    assert.deepEqual(await echo.request('echo', { a: 1 }, { requestId: 7 }), { a: 1 });
    assert.deepEqual(await echo.request('echo', { b: [2] }, { requestId: { n: 'x' } }), { b: [2] });
    assert.deepEqual(client.wire.sent, [
      { action: 'echo', request_id: 7, a: 1 },
      { action: 'echo', request_id: { n: 'x' }, b: [2] },
    ]);
    assert.deepEqual(client.wire.received, [
      { errors: [], data: { a: 1 }, action: 'echo', response_status: 200, request_id: 7 },
      { errors: [], data: { b: [2] }, action: 'echo', response_status: 200, request_id: { n: 'x' } },
    ]);
  });

  test('multiplexed streams on one socket are routed by stream and request id', async () => {
    const client = connectClient(server.ws('/ws'));
    clients.push(client);
    const todos = client.stream('todos');
    const things = client.stream('things');
    const echo = client.stream('echo');
    const owner = unique('mux');
    // The same request id on three streams at once: each reply goes to its own stream.
    const [todo, thing, echoed] = await Promise.all([
      todos.create({ title: 'muxed', owner }, { requestId: 1 }),
      things.request('create', { data: { name: owner } }, { requestId: 1 }),
      echo.request('echo', { hello: 'there' }, { requestId: 1 }),
    ]);
    assert.deepEqual(todo, { id: todo.id, title: 'muxed', done: false, owner });
    assert.deepEqual(thing, { pk: thing.pk, name: owner, counter: 0 });
    assert.deepEqual(echoed, { hello: 'there' });
    assert.deepEqual(client.wire.sent, [
      { stream: 'todos', payload: { action: 'create', request_id: 1, data: { title: 'muxed', owner } } },
      { stream: 'things', payload: { action: 'create', request_id: 1, data: { name: owner } } },
      { stream: 'echo', payload: { action: 'echo', request_id: 1, hello: 'there' } },
    ]);
    assert.deepEqual(
      client.wire.received.find((f) => f.stream === 'things'),
      { stream: 'things', payload: { errors: [], data: thing, action: 'create', response_status: 201, request_id: 1 } },
    );
  });

  test('requests made before the socket opens are sent once it does, in order', async () => {
    const client = connectClient(server.ws('/ws/echo/'));
    clients.push(client);
    assert.equal(client.state, 'connecting');
    const echo = client.stream();
    const replies = await Promise.all([1, 2, 3].map((n) => echo.request('echo', { n }, { requestId: n })));
    assert.deepEqual(replies, [{ n: 1 }, { n: 2 }, { n: 3 }]);
    assert.deepEqual(client.wire.sent.map((f) => f.request_id), [1, 2, 3]);
    assert.equal(client.state, 'open');
  });
});

describe('requests against a server that misbehaves', () => {
  let wss;
  let url;
  const seen = [];
  before(async () => {
    wss = new WebSocketServer({ host: '127.0.0.1', port: 0 });
    await new Promise((r) => wss.once('listening', r));
    url = `ws://127.0.0.1:${wss.address().port}/`;
    wss.on('connection', (socket) => {
      socket.on('message', (data) => {
        const frame = JSON.parse(String(data));
        seen.push(frame);
        if (frame.action === 'hang-up') socket.terminate();
        if (frame.action === 'push-then-reply') {
          // A push sharing the request id (another action) does not settle the request.
          socket.send(JSON.stringify({ errors: [], data: 'push', action: 'update', response_status: 200, request_id: frame.request_id }));
          socket.send(JSON.stringify({ errors: [], data: 'reply', action: 'push-then-reply', response_status: 200, request_id: frame.request_id }));
        }
        // anything else: never answered
      });
    });
  });
  after(() => new Promise((r) => wss.close(r)));

  test('no reply within the timeout rejects with TimeoutError', async () => {
    const client = connectClient(url, { requestTimeoutMs: 150 });
    const started = Date.now();
    const error = await rejection(client.stream().request('silence', {}, { requestId: 'q' }));
    assert.ok(error instanceof TimeoutError, String(error));
    assert.equal(error.action, 'silence');
    assert.equal(error.request_id, 'q');
    assert.equal(error.timeoutMs, 150);
    assert.ok(Date.now() - started >= 140);
    client.close();
  });

  test('a socket lost before the reply rejects with ConnectionError; the client reconnects', async () => {
    const client = connectClient(url);
    const error = await rejection(client.stream().request('hang-up'));
    assert.ok(error instanceof ConnectionError, String(error));
    await client.whenOpen();
    assert.equal(client.wire.urls.length, 2);
    client.close();
    const closed = await rejection(client.stream().request('anything'));
    assert.ok(closed instanceof ConnectionError);
  });

  test('only a frame naming the request action settles it', async () => {
    const client = connectClient(url);
    assert.equal(await client.stream().request('push-then-reply'), 'reply');
    client.close();
  });

  test('without a WebSocket class the client says how to pass one', () => {
    const saved = globalThis.WebSocket;
    try {
      delete globalThis.WebSocket;
      assert.throws(() => connect(url), /no WebSocket class: pass \{ WebSocket \}/);
    } finally {
      if (saved) globalThis.WebSocket = saved;
    }
  });
});

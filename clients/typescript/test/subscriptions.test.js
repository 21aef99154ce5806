// Subscriptions: instance pushes, live lists (snapshot + pushes in order, change callbacks),
// custom subscription actions, unsubscribing.
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import { RequestError } from '../dist/index.js';
import { BACKEND, byId, cleanup, connectClient, eventually, listTodos, rejection, startServer, unique } from './support/harness.js';

/** dcrf's position, checked for shape and returned. */
function position(value) {
  assert.equal(typeof value.epoch, 'string');
  assert.ok(Number.isInteger(value.offset));
  return value;
}

describe(`subscriptions (${BACKEND})`, () => {
  const clients = [];
  const servers = [];
  let server;
  before(async () => {
    server = await startServer();
    servers.push(server);
  });
  after(() => cleanup(clients, servers));

  test('subscribeInstance delivers update and delete pushes of one row', async () => {
    const client = connectClient(server.ws('/ws'));
    const writer = connectClient(server.ws('/ws/todos/'));
    clients.push(client, writer);
    const todos = client.stream('todos');
    const owner = unique('inst');
    const todo = await writer.stream().create({ title: 'watched', owner });
    const seen = [];
    const sub = await todos.subscribeInstance(todo.id, (value, action) => seen.push([action, value]), { requestId: 'i1' });
    assert.deepEqual(client.wire.sent[0], {
      stream: 'todos',
      payload: { action: 'subscribe_instance', request_id: 'i1', pk: todo.id },
    });
    const reply = client.wire.received[0];
    assert.deepEqual(
      { ...reply, payload: { ...reply.payload, position: undefined } },
      {
        stream: 'todos',
        payload: { errors: [], data: null, action: 'subscribe_instance', response_status: 201, request_id: 'i1', position: undefined },
      },
    );
    position(reply.payload.position);
    assert.equal(sub.status, 'live');

    await writer.stream().patch(todo.id, { done: true });
    await writer.stream().delete(todo.id);
    await eventually(() => seen.length === 2, 'two pushes');
    assert.deepEqual(seen, [
      ['update', { ...todo, done: true }],
      ['delete', null],
    ]);
    assert.equal(sub.value, null);
    const del = client.wire.received.at(-1).payload;
    assert.deepEqual({ ...del, position: undefined }, {
      errors: [],
      data: { pk: todo.id },
      action: 'delete',
      response_status: 204,
      request_id: 'i1',
      position: undefined,
    });
    assert.deepEqual(sub.position, del.position);
  });

  test('subscribeList holds the snapshot plus every push, in order, with change callbacks', async () => {
    const client = connectClient(server.ws('/ws'));
    const writer = connectClient(server.ws('/ws/todos/'));
    clients.push(client, writer);
    const owner = unique('list');
    const w = writer.stream();
    const a = await w.create({ title: 'a', owner });
    const b = await w.create({ title: 'b', owner, done: true });

    const live = await client.stream('todos').subscribeList({ filters: { owner }, ordering: '-id', requestId: 'L' });
    assert.deepEqual(client.wire.sent[0], {
      stream: 'todos',
      payload: { action: 'subscribe_list', request_id: 'L', filters: { owner }, ordering: '-id' },
    });
    const reply = client.wire.received[0].payload;
    assert.equal(reply.response_status, 201);
    assert.deepEqual(reply.data.results, [b, a]);
    assert.deepEqual(reply.data.position, reply.position);
    assert.deepEqual(live.items, [b, a]);
    assert.equal(live.status, 'live');
    assert.deepEqual(live.position, position(reply.position));

    const changes = [];
    live.onChange((list, change) => changes.push([change, list.items.map((t) => t.title)]));
    const c = await w.create({ title: 'c', owner });
    await w.patch(a.id, { title: 'a2' });
    await w.delete(b.id);
    await w.create({ title: 'not mine', owner: unique('other') });
    await eventually(() => changes.length === 3, 'three changes');
    assert.deepEqual(changes, [
      [{ type: 'create', item: c }, ['c', 'b', 'a']],
      [{ type: 'update', item: { ...a, title: 'a2' }, previous: a }, ['c', 'b', 'a2']],
      [{ type: 'delete', pk: b.id, previous: b }, ['c', 'a2']],
    ]);
    assert.deepEqual(byId(live.items), await listTodos(server, owner));
    // Offsets grow along the stream.
    const offsets = client.wire.received.map((f) => f.payload.position.offset);
    assert.deepEqual(offsets, [...offsets].sort((x, y) => x - y));
  });

  test('a filtered live list drops rows updated out of its set, and bulk writes reach it', async () => {
    const client = connectClient(server.ws('/ws/todos/'));
    const writer = connectClient(server.ws('/ws/todos/'));
    clients.push(client, writer);
    const owner = unique('filtered');
    const w = writer.stream();
    const rows = [];
    for (const title of ['x', 'y', 'z']) rows.push(await w.create({ title, owner }));
    const live = await client.stream().subscribeList({ filters: { owner, done: false } });
    assert.equal(live.size, 3);
    await w.patch(rows[0].id, { done: true });
    await eventually(() => live.size === 2, 'the done row to leave');
    assert.equal(live.get(rows[0].id), undefined);
    assert.deepEqual(await w.request('bulk_set_done', { ids: rows.map((r) => r.id), done: true }), { updated: 3 });
    await eventually(() => live.size === 0, 'every row to leave');
    await w.request('bulk_set_done', { ids: rows.map((r) => r.id), done: false });
    await eventually(() => live.size === 3, 'every row to come back');
    assert.deepEqual(byId(live.items), await listTodos(server, owner));
  });

  test('close() unsubscribes: 204, and no more pushes', async () => {
    const client = connectClient(server.ws('/ws/todos/'));
    const writer = connectClient(server.ws('/ws/todos/'));
    clients.push(client, writer);
    const owner = unique('close');
    const live = await client.stream().subscribeList({ filters: { owner }, requestId: 'C' });
    await live.close();
    assert.equal(live.status, 'closed');
    assert.deepEqual(client.wire.sent.at(-1), { action: 'unsubscribe_list', request_id: 'C' });
    assert.deepEqual(client.wire.received.at(-1), {
      errors: [],
      data: null,
      action: 'unsubscribe_list',
      response_status: 204,
      request_id: 'C',
    });
    await writer.stream().create({ title: 'unseen', owner });
    // A round trip after the write: any push for it would have arrived before this reply.
    await client.stream().list({ filters: { owner } });
    assert.equal(live.size, 0);
    assert.equal(client.wire.received.filter((f) => f.request_id === 'C').length, 2);
  });

  test('a refused subscribe rejects with RequestError', async () => {
    const client = connectClient(server.ws('/ws/todos/'));
    clients.push(client);
    const error = await rejection(client.stream().subscribeList({ filters: { title: 'x' } }));
    assert.ok(error instanceof RequestError);
    assert.equal(error.response_status, 400);
    assert.equal(error.action, 'subscribe_list');
  });

  test('a custom subscription (subscribe_to_all) gets every change', async () => {
    const client = connectClient(server.ws('/ws'));
    const writer = connectClient(server.ws('/ws/todos/'));
    clients.push(client, writer);
    const owner = unique('all');
    const events = [];
    const sub = await client.stream('todos').subscribe({
      action: 'subscribe_to_all',
      unsubscribeAction: 'unsubscribe_from_all',
      requestId: 'A',
      onEvent: (p) => {
        if (p.data && p.data.owner === owner) events.push([p.action, p.data.title]);
      },
    });
    const t = await writer.stream().create({ title: 'one', owner });
    await writer.stream().patch(t.id, { title: 'two' });
    await writer.stream().delete(t.id);
    await eventually(() => events.length === 3, 'three events');
    assert.deepEqual(events, [
      ['create', 'one'],
      ['update', 'two'],
      ['delete', 'two'],
    ]);
    await sub.close();
    assert.deepEqual(client.wire.received.at(-1), {
      stream: 'todos',
      payload: { errors: [], data: { subscribed: false }, action: 'unsubscribe_from_all', response_status: 204, request_id: 'A' },
    });
  });

  test('live lists of two streams on one multiplexed socket stay apart', async () => {
    const client = connectClient(server.ws('/ws'));
    const writer = connectClient(server.ws('/ws'));
    clients.push(client, writer);
    const owner = unique('two');
    const todosLive = await client.stream('todos').subscribeList({ filters: { owner }, requestId: 'same' });
    const thingsLive = await client.stream('things_with_id').subscribeList({ requestId: 'same' });
    const before = thingsLive.size;
    await writer.stream('todos').create({ title: 'todo', owner });
    const thing = await writer.stream('things_with_id').create({ name: owner });
    await eventually(() => todosLive.size === 1 && thingsLive.size === before + 1, 'one push on each stream');
    assert.equal(todosLive.items[0].title, 'todo');
    assert.deepEqual(thingsLive.get(thing.id), thing);
  });
});

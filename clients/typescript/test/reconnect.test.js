// Reconnection: backoff, every subscription resumed with `since`, a reload when the server
// cannot replay (`recovered: false`), live lists converging after a server restart with no
// call from the test, and token refresh.
import assert from 'node:assert/strict';
import { after, describe, test } from 'node:test';

import { WebSocketServer } from 'ws';

import {
  BACKEND,
  LAYER,
  byId,
  cleanup,
  connectClient,
  eventually,
  hs256,
  listTodos,
  persistentDatabase,
  startServer,
  unique,
} from './support/harness.js';

/** The payloads `client` received for request id `rid` and action `action`. */
function replies(client, rid, action) {
  return client.wire.received
    .map((f) => (f.payload && f.stream ? f.payload : f))
    .filter((p) => p.request_id === rid && p.action === action);
}

/** The subscribe frames `client` sent with request id `rid`. */
function sentWith(client, rid) {
  return client.wire.sent.map((f) => (f.payload && f.stream ? f.payload : f)).filter((p) => p.request_id === rid);
}

describe(`reconnection (${BACKEND})`, () => {
  const clients = [];
  const servers = [];
  after(() => cleanup(clients, servers));

  test('a dropped connection resumes every subscription with since and replays what it missed', async () => {
    const server = await startServer();
    servers.push(server);
    const client = connectClient(server.ws('/ws'));
    const writer = connectClient(server.ws('/ws/todos/'));
    clients.push(client, writer);
    const owner = unique('drop');
    const w = writer.stream();
    const kept = await w.create({ title: 'kept', owner });
    const live = await client.stream('todos').subscribeList({ filters: { owner }, requestId: 'L' });
    const instanceSeen = [];
    const inst = await client.stream('todos').subscribeInstance(kept.id, (v, a) => instanceSeen.push([a, v && v.title]), { requestId: 'I' });
    const states = [];
    client.onStateChange((s) => states.push(s));
    const statuses = [];
    live.onStatus((s) => statuses.push(s));
    const before = live.position;
    const instBefore = inst.position;

    client.wire.blocked = true;
    client.wire.breakSocket();
    await eventually(() => client.state === 'reconnecting', 'the client to notice the drop');
    assert.equal(live.status, 'stale');
    const added = await w.create({ title: 'added while away', owner });
    await w.patch(kept.id, { title: 'kept, renamed' });
    await eventually(() => client.wire.urls.length >= 3, 'at least one refused attempt');
    client.wire.blocked = false;

    await eventually(() => live.status === 'live' && live.size === 2 && instanceSeen.length === 1, 'the replay');
    const [first, resumed] = sentWith(client, 'L');
    assert.equal(first.since, undefined);
    assert.deepEqual(resumed, {
      action: 'subscribe_list',
      request_id: 'L',
      filters: { owner },
      since: before,
    });
    const [, reply] = replies(client, 'L', 'subscribe_list');
    assert.equal(reply.recovered, true, JSON.stringify(reply));
    assert.equal(reply.data.results, undefined, 'no snapshot when recovered');
    assert.deepEqual(byId(live.items), [{ ...kept, title: 'kept, renamed' }, added]);
    assert.deepEqual(byId(live.items), await listTodos(server, owner));
    assert.deepEqual(instanceSeen, [['update', 'kept, renamed']]);
    assert.deepEqual(sentWith(client, 'I').at(-1), { action: 'subscribe_instance', request_id: 'I', pk: kept.id, since: instBefore });
    assert.equal(replies(client, 'I', 'subscribe_instance').at(-1).recovered, true);
    assert.deepEqual(states.slice(0, 1), ['reconnecting']);
    assert.equal(states.at(-1), 'open');
    assert.deepEqual(statuses.slice(0, 1), ['stale']);
    assert.deepEqual(statuses.slice(-2), ['subscribing', 'live']);
  });

  test('server restarted mid-subscription: the live list converges to list with no call from the test', async () => {
    const database = persistentDatabase();
    let server = await startServer({ database });
    servers.push(server);
    const port = server.port;
    const client = connectClient(server.ws('/ws'));
    const writer = connectClient(server.ws('/ws/todos/'));
    clients.push(client, writer);
    const owner = unique('restart');
    const w = writer.stream();
    const one = await w.create({ title: 'one', owner });
    const two = await w.create({ title: 'two', owner });
    const live = await client.stream('todos').subscribeList({ filters: { owner }, ordering: 'id', requestId: 'R' });
    const refetched = [];
    await client.stream('todos').subscribeInstance(two.id, (v, a) => refetched.push([a, v && v.title]), { requestId: 'T' });
    assert.deepEqual(live.items, [one, two]);

    // Keep the subscriber away until the writer has changed things on the new server.
    client.wire.blocked = true;
    await server.stop();
    servers.splice(servers.indexOf(server), 1);
    server = await startServer({ database, port });
    servers.push(server);
    await w.delete(one.id); // queued by the writer until it has reconnected
    const three = await w.create({ title: 'three', owner });
    await w.patch(two.id, { done: true });
    client.wire.blocked = false;

    await eventually(async () => {
      assert.equal(live.status, 'live');
      assert.deepEqual(live.items, await listTodos(server, owner));
      return true;
    }, 'the live list to converge');
    assert.deepEqual(live.items, [{ ...two, done: true }, three]);
    const reply = replies(client, 'R', 'subscribe_list').at(-1);
    assert.ok(sentWith(client, 'R').at(-1).since, 'resubscribed with since');
    if (LAYER) {
      // Positions live in Redis: the new process resumes the same epoch.
      assert.equal(reply.recovered, true, JSON.stringify(reply));
    } else {
      // A new process of the memory layer starts a new epoch: a fresh snapshot.
      assert.equal(reply.recovered, false, JSON.stringify(reply));
      assert.deepEqual(reply.data.results.map((t) => t.title).sort(), ['three', 'two']);
      // The instance subscription could not be replayed: the row was retrieved again.
      await eventually(() => refetched.length > 0, 'the instance reload');
      assert.deepEqual(refetched.at(-1), ['update', 'two']);
      assert.ok(sentWith(client, 'T').some((p) => p.action === 'retrieve' || p.action === 'subscribe_instance'));
    }
  });

  test('a refreshed token keeps the connection open past the first one\'s expiry', async () => {
    const server = await startServer();
    servers.push(server);
    const now = () => Math.floor(Date.now() / 1000);
    const issued = [];
    const client = connectClient(server.ws('/ws/echo/'), {
      token: () => {
        const token = hs256({ sub: 'ada', username: 'Ada', exp: now() + 3 });
        issued.push(token);
        return token;
      },
      refreshBeforeExpiryMs: 1500,
    });
    clients.push(client);
    const echo = client.stream();
    const me = await echo.request('whoami');
    assert.equal(me.id, 'ada');
    assert.equal(me.username, 'Ada');
    assert.ok(client.wire.urls[0].endsWith(`?token=${issued[0]}`));
    await eventually(() => replies(client, client.wire.sent.find((f) => f.action === 'refresh_token')?.request_id, 'refresh_token').length, 'the refresh', 4000);
    const refresh = client.wire.sent.find((f) => f.action === 'refresh_token');
    assert.deepEqual(refresh, { action: 'refresh_token', request_id: refresh.request_id, token: issued[1] });
    const [answer] = replies(client, refresh.request_id, 'refresh_token');
    assert.equal(answer.response_status, 200);
    assert.deepEqual(Object.keys(answer.data), ['exp']);
    // Past the first token's expiry: still the same socket.
    await new Promise((r) => setTimeout(r, 2200));
    assert.equal((await echo.request('whoami')).id, 'ada');
    assert.equal(client.wire.urls.length, 1, 'never reconnected');
  });
});

describe('token expiry against servers without refresh_token', () => {
  test('close 4401 reconnects at once with a fresh token; a 405 stops refreshing', async () => {
    const wss = new WebSocketServer({ host: '127.0.0.1', port: 0 });
    await new Promise((r) => wss.once('listening', r));
    const port = wss.address().port;
    const connections = [];
    const refreshes = [];
    wss.on('connection', (socket, req) => {
      connections.push({ url: req.url, at: Date.now() });
      socket.on('message', (data) => {
        const frame = JSON.parse(String(data));
        if (frame.action === 'refresh_token') {
          refreshes.push(frame);
          // What Python DCRF answers for an action it does not have.
          socket.send(JSON.stringify({ errors: [`Method "refresh_token" not allowed.`], data: null, action: 'refresh_token', response_status: 405, request_id: frame.request_id }));
          setTimeout(() => socket.close(4401, 'token expired'), 100);
        }
      });
    });
    let n = 0;
    const now = () => Math.floor(Date.now() / 1000);
    const client = connectClient(`ws://127.0.0.1:${port}/`, {
      token: () => hs256({ sub: 'u', exp: now() + 2, n: ++n }),
      refreshBeforeExpiryMs: 1000,
      backoff: { minDelayMs: 5000, maxDelayMs: 5000 },
    });
    try {
      await eventually(() => connections.length === 2, 'the reconnection after 4401', 5000);
      assert.equal(refreshes.length, 1);
      // No backoff after 4401 (the backoff here is 5 s).
      assert.ok(connections[1].at - connections[0].at < 3000);
      const tokens = connections.map((c) => new URL(c.url, 'ws://x').searchParams.get('token'));
      assert.notEqual(tokens[0], tokens[1]);
      assert.equal(JSON.parse(Buffer.from(tokens[1].split('.')[1], 'base64url')).n, 3, 'first, refresh, reconnect');
      // Refreshing is not tried again on that server.
      await new Promise((r) => setTimeout(r, 1500));
      assert.equal(refreshes.length, 1);
    } finally {
      client.close();
      await new Promise((r) => wss.close(r));
    }
  });
});

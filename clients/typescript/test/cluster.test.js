// PostgreSQL + Redis: a client moved from one node to another resumes with `recovered: true`;
// a Redis restart (a private redis-server) leaves every live list converging to `list`.
import assert from 'node:assert/strict';
import { after, describe, test } from 'node:test';

import {
  LAYER,
  SHARED_DATABASE,
  byId,
  cleanup,
  connectClient,
  eventually,
  freePort,
  hasCommand,
  listTodos,
  startRedis,
  startServer,
  unique,
} from './support/harness.js';

const CLUSTER = SHARED_DATABASE && LAYER ? false : 'needs DCRF_TEST_DATABASE_URL (PostgreSQL) and DCRF_TEST_LAYER (Redis)';
const REDIS_RESTART = CLUSTER || (hasCommand('redis-server') ? false : 'needs redis-server on PATH');

describe('two nodes on PostgreSQL and Redis', () => {
  const clients = [];
  const servers = [];
  after(() => cleanup(clients, servers));

  test('a client moved from one node to the other resumes with recovered: true', { skip: CLUSTER }, async () => {
    const a = await startServer();
    const b = await startServer();
    servers.push(a, b);
    const client = connectClient(a.ws('/ws'));
    const writer = connectClient(b.ws('/ws/todos/'));
    clients.push(client, writer);
    const owner = unique('moved');
    const w = writer.stream();
    const first = await w.create({ title: 'first', owner });
    const live = await client.stream('todos').subscribeList({ filters: { owner }, requestId: 'M' });
    assert.deepEqual(live.items, [first]);
    // A push written on node B reaches the subscriber on node A.
    const second = await w.create({ title: 'second', owner });
    await eventually(() => live.size === 2, 'the cross-node push');
    const before = live.position;

    client.wire.blocked = true;
    await a.kill();
    const third = await w.create({ title: 'third', owner });
    await w.patch(first.id, { done: true });
    await w.delete(second.id);
    client.wire.target = `127.0.0.1:${b.port}`;
    client.wire.blocked = false;

    await eventually(async () => {
      assert.equal(live.status, 'live');
      assert.deepEqual(byId(live.items), await listTodos(b, owner));
      return true;
    }, 'the live list to converge on node B');
    assert.deepEqual(byId(live.items), [{ ...first, done: true }, third]);
    const resumed = client.wire.sent.filter((f) => f.payload.request_id === 'M').at(-1).payload;
    assert.deepEqual(resumed, { action: 'subscribe_list', request_id: 'M', filters: { owner }, since: before });
    const reply = client.wire.received.filter((f) => f.payload.request_id === 'M' && f.payload.action === 'subscribe_list').at(-1);
    assert.equal(reply.payload.recovered, true, JSON.stringify(reply));
    assert.ok(client.wire.urls.at(-1).includes(`:${b.port}/`));
  });

  test('Redis restarted: the live list converges to list with no call from the test', { skip: REDIS_RESTART }, async () => {
    const port = await freePort();
    let redis = await startRedis(port);
    const server = await startServer({ layer: redis.url });
    servers.push(server);
    const client = connectClient(server.ws('/ws'));
    const writer = connectClient(server.ws('/ws/todos/'));
    clients.push(client, writer);
    const owner = unique('redis');
    const w = writer.stream();
    const one = await w.create({ title: 'one', owner });
    const live = await client.stream('todos').subscribeList({ filters: { owner }, requestId: 'X' });
    const changes = [];
    live.onChange((_, change) => changes.push(change.type));

    await redis.kill();
    // Writes go on while Redis is down (the database is the source of truth).
    const two = await w.create({ title: 'two', owner });
    await w.patch(one.id, { title: 'one, renamed' });
    redis = await startRedis(port);
    try {
      const three = await w.create({ title: 'three', owner });
      await eventually(async () => {
        assert.deepEqual(byId(live.items), await listTodos(server, owner));
        return true;
      }, 'the live list to converge after the Redis restart', 20000);
      assert.deepEqual(byId(live.items), [{ ...one, title: 'one, renamed' }, two, three]);
      assert.equal(live.status, 'live');
      // The gap was announced (a resync with a fresh snapshot), not silently skipped.
      assert.ok(changes.includes('snapshot'), JSON.stringify(changes));
      assert.ok(client.wire.received.some((f) => f.payload.action === 'resync' && f.payload.request_id === 'X'));
    } finally {
      await cleanup(clients, servers);
      await redis.kill();
    }
  });
});

'use strict';
// Reconnection: the server is stopped (SIGTERM) and a new one started on the same port with
// the same database. dcrf-client (reconnecting-websocket) reconnects by itself, re-sends its
// subscribe frames unchanged, flushes the requests queued while it was offline, and events
// flow again.

const assert = require('node:assert/strict');
const { after, describe, it } = require('node:test');

const {
  Inbox,
  THING_STREAMS,
  closeClients,
  connectClient,
  nextClose,
  nextReconnect,
  persistentDatabase,
  startServer,
  uniqueName,
  withTimeout,
} = require('../support/harness');

describe('reconnect', () => {
  const database = persistentDatabase();
  const servers = [];
  const clients = [];

  after(async () => {
    closeClients(clients);
    for (const server of servers.splice(0)) await server.stop();
  });

  for (const { stream, pkField } of THING_STREAMS) {
    it(`re-subscribes after a server restart on the same port (${stream})`, async () => {
      const first = await startServer({ database });
      servers.push(first);
      const client = await connectClient(first, { pkField });
      clients.push(client);
      const sent = client.sent;

      const created = await withTimeout(
        client.create(stream, { name: uniqueName() }),
        'create reply',
      );
      const pk = created[pkField];
      const rid = `reconnect-${uniqueName()}`;
      const events = new Inbox('update event');
      await withTimeout(client.subscribe(stream, pk, events.push, rid), 'subscribe reply');
      await withTimeout(client.patch(stream, pk, { counter: 1 }), 'patch reply');
      const [before] = await events.next('update event before the restart');
      assert.equal(before.counter, 1);

      // Stop the server; the socket closes.
      const closed = nextClose(client);
      await first.stop();
      servers.splice(servers.indexOf(first), 1);
      await withTimeout(closed, 'client socket close after SIGTERM');

      // A request made while offline is queued by the client.
      const reconnected = nextReconnect(client);
      const sentBefore = sent.length;
      const queued = client.patch(stream, pk, { counter: 2 });

      const second = await startServer({ database, port: first.port });
      servers.push(second);
      await withTimeout(reconnected, `reconnect to ${second.url}`, 15000);

      // The subscription frame is re-sent unchanged, before the queued request.
      const resent = sent.slice(sentBefore);
      assert.deepEqual(resent[0], {
        stream,
        payload: { action: 'subscribe_instance', request_id: rid, pk },
      });
      assert.deepEqual(resent[1].payload.action, 'patch');

      assert.deepEqual(
        await withTimeout(queued, 'reply to the request queued while offline'),
        { [pkField]: pk, name: created.name, counter: 2 },
      );
      const [afterRestart, action] = await events.next('update event after the restart');
      assert.equal(action, 'update');
      assert.deepEqual(afterRestart, { [pkField]: pk, name: created.name, counter: 2 });

      await withTimeout(client.patch(stream, pk, { counter: 3 }), 'patch reply');
      const [later] = await events.next('second update event after the restart');
      assert.equal(later.counter, 3);

      await withTimeout(client.delete(stream, pk), 'delete reply');
      const [deleted, deleteAction] = await events.next('delete event after the restart');
      assert.equal(deleteAction, 'delete');
      assert.deepEqual(deleted, { [pkField]: pk });

      closeClients(clients);
      await second.stop();
      servers.splice(servers.indexOf(second), 1);
    });
  }
});

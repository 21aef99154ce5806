'use strict';
// Instance subscriptions (`subscribe_instance`) through dcrf-client 0.3.0's `subscribe()`:
// update and delete events, request-id routing, in-order processing, unsubscribe.

const assert = require('node:assert/strict');
const { after, afterEach, before, beforeEach, describe, it } = require('node:test');

const {
  Inbox,
  THING_STREAMS,
  closeClients,
  connectClient,
  listenFrames,
  roundTrip,
  startServer,
  uniqueName,
  withTimeout,
} = require('../support/harness');

for (const { stream, pkField } of THING_STREAMS) {
  describe(`${stream} (pkField "${pkField}")`, () => {
    let server;
    let client;
    const clients = [];
    const thing = (pk, name, counter = 0) => ({ [pkField]: pk, name, counter });
    const create = (props) =>
      withTimeout(client.create(stream, { name: uniqueName(), ...props }), 'create reply');

    before(async () => {
      server = await startServer();
    });
    after(async () => {
      closeClients(clients);
      if (server) await server.stop();
    });
    beforeEach(async () => {
      client = await connectClient(server, { pkField });
      clients.push(client);
    });
    afterEach(() => closeClients(clients));

    it('invokes callback on change (subscribe and update sent back to back)', async () => {
      const created = await create();
      const pk = created[pkField];
      const events = new Inbox('update event');
      // Neither is awaited before the other is sent: the server must handle the subscribe
      // before the update, or the update's event is lost.
      const subscribed = client.subscribe(stream, pk, events.push);
      const updated = client.update(stream, pk, { name: 'new' });

      const [data, action] = await events.next('update event');
      assert.equal(action, 'update');
      assert.deepEqual(data, thing(pk, 'new', 0));
      assert.equal(await withTimeout(subscribed, 'subscribe reply'), null);
      assert.deepEqual(await withTimeout(updated, 'update reply'), thing(pk, 'new', 0));
    });

    it('replies 201 with data null to subscribe_instance', async () => {
      const created = await create();
      const rid = `sub-${uniqueName()}`;
      const frames = listenFrames(client, { stream, payload: { request_id: rid } });
      await withTimeout(client.subscribe(stream, created[pkField], () => {}, rid), 'subscribe');
      const frame = await frames.next('subscribe reply frame');
      assert.deepEqual(frame, {
        stream,
        payload: {
          errors: [],
          data: null,
          action: 'subscribe_instance',
          response_status: 201,
          request_id: rid,
        },
      });
    });

    it('invokes callback on delete with exactly the pk', async () => {
      const created = await create();
      const pk = created[pkField];
      const events = new Inbox('delete event');
      const rid = `sub-${uniqueName()}`;
      const frames = listenFrames(client, {
        stream,
        payload: { action: 'delete', request_id: rid },
      });
      await withTimeout(client.subscribe(stream, pk, events.push, rid), 'subscribe reply');
      assert.equal(await withTimeout(client.delete(stream, pk), 'delete reply'), null);

      const [data, action] = await events.next('delete event');
      assert.equal(action, 'delete');
      // The client renames `pk` to its pkField; the server sends exactly {"pk": pk}.
      assert.deepEqual(data, { [pkField]: pk });
      const frame = await frames.next('delete event frame');
      assert.equal(frame.payload.response_status, 204);
    });

    it('routes events of several subscriptions on one socket by request id', async () => {
      const things = await withTimeout(
        Promise.all([0, 1, 2].map(() => client.create(stream, { name: uniqueName() }))),
        'three create replies',
      );
      const rids = things.map((_, i) => `multi-${i}-${uniqueName()}`);
      const inboxes = things.map((_, i) => new Inbox(`events of subscription ${i}`));
      // Every frame carrying each request id, whatever the client's selectors would drop.
      const raw = rids.map((rid) => listenFrames(client, { stream, payload: { request_id: rid } }));
      await withTimeout(
        Promise.all(
          things.map((t, i) => client.subscribe(stream, t[pkField], inboxes[i].push, rids[i])),
        ),
        'three subscribe replies',
      );
      for (const r of raw) await r.next('subscribe reply'); // drop the 201s

      const updated = await withTimeout(
        Promise.all(
          things.map((t, i) => client.patch(stream, t[pkField], { counter: 100 + i })),
        ),
        'three patch replies',
      );
      for (const [i, t] of things.entries()) {
        const [data, action] = await inboxes[i].next(`update event of subscription ${i}`);
        assert.equal(action, 'update');
        assert.deepEqual(data, updated[i]);
        assert.deepEqual(data, thing(t[pkField], t.name, 100 + i));
      }
      // Every event has been handled: anything else they pushed arrives before this reply.
      await roundTrip(client, stream, things[0][pkField]);
      for (const [i, t] of things.entries()) {
        assert.deepEqual(
          raw[i].items.map((f) => f.payload.data[pkField]),
          [t[pkField]],
          `subscription ${i} (${rids[i]}) got frames for other objects`,
        );
        assert.deepEqual(inboxes[i].items, [], `subscription ${i} got extra events`);
      }
    });

    it('processes frames in order: many subscribe/update pairs sent at once', async () => {
      const things = await withTimeout(
        Promise.all([0, 1, 2, 3, 4].map(() => client.create(stream, { name: uniqueName() }))),
        'five create replies',
      );
      const inboxes = things.map((_, i) => new Inbox(`update event ${i}`));
      const sent = [];
      for (const [i, t] of things.entries()) {
        sent.push(client.subscribe(stream, t[pkField], inboxes[i].push));
        sent.push(client.patch(stream, t[pkField], { counter: i + 1 }));
      }
      for (const [i, t] of things.entries()) {
        const [data, action] = await inboxes[i].next(`update event ${i}`);
        assert.equal(action, 'update');
        assert.deepEqual(data, thing(t[pkField], t.name, i + 1));
      }
      await withTimeout(Promise.all(sent), 'subscribe and patch replies');
    });

    it('pushes changes made by another connection', async () => {
      const other = await connectClient(server, { pkField });
      clients.push(other);
      const created = await create();
      const pk = created[pkField];
      const events = new Inbox('update event');
      await withTimeout(client.subscribe(stream, pk, events.push), 'subscribe reply');

      await withTimeout(other.patch(stream, pk, { counter: 42 }), 'patch reply (other socket)');
      const [data, action] = await events.next('update event caused by the other socket');
      assert.equal(action, 'update');
      assert.deepEqual(data, thing(pk, created.name, 42));

      await withTimeout(other.delete(stream, pk), 'delete reply (other socket)');
      const [deleted, deleteAction] = await events.next('delete event caused by the other socket');
      assert.equal(deleteAction, 'delete');
      assert.deepEqual(deleted, { [pkField]: pk });
    });

    it('pushes changes made through the other stream of the same table', async () => {
      const otherStream = THING_STREAMS.find((s) => s.stream !== stream).stream;
      const created = await create();
      const pk = created[pkField];
      const events = new Inbox('update event');
      await withTimeout(client.subscribe(stream, pk, events.push), 'subscribe reply');

      // The lookup kwarg is `pk` on both streams.
      await withTimeout(client.patch(otherStream, pk, { counter: 8 }), `patch via ${otherStream}`);
      const [data, action] = await events.next(`update event after a patch via ${otherStream}`);
      assert.equal(action, 'update');
      // Serialized in this stream's representation.
      assert.deepEqual(data, thing(pk, created.name, 8));
    });

    it('stops events after unsubscribe_instance with the same request id', async () => {
      const created = await create();
      const pk = created[pkField];
      const rid = `unsub-${uniqueName()}`;
      const events = new Inbox('events of the cancelled subscription');
      const sentinel = new Inbox('events of the sentinel subscription');
      await withTimeout(client.subscribe(stream, pk, events.push, rid), 'subscribe reply');
      await withTimeout(client.subscribe(stream, pk, sentinel.push), 'sentinel subscribe reply');

      const reply = listenFrames(client, {
        stream,
        payload: { action: 'unsubscribe_instance', request_id: rid },
      });
      const result = await withTimeout(
        client.request(stream, { action: 'unsubscribe_instance', pk }, rid),
        'unsubscribe_instance reply',
      );
      assert.equal(result, null);
      assert.equal((await reply.next('unsubscribe reply frame')).payload.response_status, 204);

      await withTimeout(client.patch(stream, pk, { counter: 2 }), 'patch reply');
      const [data] = await sentinel.next('sentinel update event');
      assert.deepEqual(data, thing(pk, created.name, 2));
      // A push of the same event to the cancelled request id would arrive before this reply.
      await roundTrip(client, stream, pk);
      assert.deepEqual(events.items, [], 'the unsubscribed request id still received events');
    });
  });
}

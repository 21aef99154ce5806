'use strict';
// The custom `subscribe_many` / `unsubscribe_many` actions (the client's 1.x integration
// scenarios), driven through dcrf-client 0.3.0's extension points: buildSubscribePayload and
// selectors without the data condition, plus dispatcher.listen for create events.

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

/** Client options making `subscribe(stream, things|null, cb, rid)` send `subscribe_many`. */
function subscribeManyOptions(pkField) {
  return {
    pkField,
    buildSubscribePayload: (things, requestId) =>
      things == null
        ? { action: 'subscribe_many', request_id: requestId }
        : { action: 'subscribe_many', request_id: requestId, things },
    buildSubscribeUpdateSelector: (stream, _pk, requestId) => ({
      stream,
      payload: { action: 'update', request_id: requestId },
    }),
    buildSubscribeDeleteSelector: (stream, _pk, requestId) => ({
      stream,
      payload: { action: 'delete', request_id: requestId },
    }),
  };
}

for (const { stream, pkField } of THING_STREAMS) {
  describe(`${stream} (pkField "${pkField}") subscribe_many`, () => {
    let server;
    let client;
    const clients = [];
    const otherStream = THING_STREAMS.find((s) => s.stream !== stream).stream;
    const thing = (pk, name, counter = 0) => ({ [pkField]: pk, name, counter });
    const create = (props, via = stream) =>
      withTimeout(client.create(via, { name: uniqueName(), ...props }), `create reply (${via})`);
    const subscribeMany = (things, callback, rid) =>
      withTimeout(client.subscribe(stream, things, callback, rid), 'subscribe_many reply');

    before(async () => {
      server = await startServer();
    });
    after(async () => {
      closeClients(clients);
      if (server) await server.stop();
    });
    beforeEach(async () => {
      client = await connectClient(server, subscribeManyOptions(pkField));
      clients.push(client);
    });
    afterEach(() => closeClients(clients));

    it('replies 201 with data null and pushes create events', async () => {
      const rid = `many-${uniqueName()}`;
      const replies = listenFrames(client, { stream, payload: { request_id: rid } });
      assert.equal(await subscribeMany(null, () => {}, rid), null);
      assert.deepEqual((await replies.next('subscribe_many reply frame')).payload, {
        errors: [],
        data: null,
        action: 'subscribe_many',
        response_status: 201,
        request_id: rid,
      });

      const name = uniqueName('created');
      const created = await create({ name, counter: 4 });
      const frame = await replies.take(
        (f) => f.payload.action === 'create' && f.payload.data && f.payload.data.name === name,
        'create event',
      );
      assert.deepEqual(frame, {
        stream,
        payload: {
          errors: [],
          data: thing(created[pkField], name, 4),
          action: 'create',
          response_status: 200,
          request_id: rid,
        },
      });
    });

    it('pushes create events for rows created through the other stream', async () => {
      const rid = `many-${uniqueName()}`;
      const creates = listenFrames(client, { stream, payload: { action: 'create', request_id: rid } });
      await subscribeMany(null, () => {}, rid);
      const name = uniqueName('elsewhere');
      const created = await create({ name }, otherStream);
      const otherPkField = THING_STREAMS.find((s) => s.stream === otherStream).pkField;
      const frame = await creates.take((f) => f.payload.data.name === name, 'create event');
      // In this stream's representation, whichever stream made the row.
      assert.deepEqual(frame.payload.data, thing(created[otherPkField], name, 0));
    });

    it('does not call the subscription callback on create, then calls it on update', async () => {
      const events = new Inbox('subscription callback');
      await subscribeMany(null, events.push, `many-${uniqueName()}`);
      const created = await create();
      const pk = created[pkField];
      await withTimeout(client.patch(stream, pk, { counter: 3 }), 'patch reply');
      // Without create selectors, the first callback is the update, not the create.
      const [data, action] = await events.take(
        ([d]) => d[pkField] === pk,
        'first callback for the new row',
      );
      assert.equal(action, 'update');
      assert.deepEqual(data, thing(pk, created.name, 3));
    });

    it('invokes callback on update', async () => {
      const created = await create({ counter: 1 });
      const pk = created[pkField];
      const events = new Inbox('update event');
      await subscribeMany(null, events.push, `many-${uniqueName()}`);
      const name = uniqueName('updated');
      await withTimeout(client.update(stream, pk, { name, counter: 2 }), 'update reply');
      const [data, action] = await events.take(([d]) => d[pkField] === pk, 'update event');
      assert.equal(action, 'update');
      assert.deepEqual(data, thing(pk, name, 2));
    });

    it('invokes callback on delete', async () => {
      const created = await create({ counter: 6 });
      const pk = created[pkField];
      const rid = `many-${uniqueName()}`;
      const events = new Inbox('delete event');
      const frames = listenFrames(client, { stream, payload: { action: 'delete', request_id: rid } });
      await subscribeMany(null, events.push, rid);
      assert.equal(await withTimeout(client.delete(stream, pk), 'delete reply'), null);

      const frame = await frames.next('delete event frame');
      assert.equal(frame.payload.response_status, 204);
      const [data, action] = await events.next('delete event');
      assert.equal(action, 'delete');
      // The server sends the ThingSerializer data (key `pk`) on both streams; the client
      // moves `pk` to its pkField.
      assert.deepEqual(data, thing(pk, created.name, 6));
    });

    it('follows only the listed things', async () => {
      const [a, b] = await Promise.all([create(), create()]);
      const rid = `many-${uniqueName()}`;
      const frames = listenFrames(client, { stream, payload: { request_id: rid } });
      await subscribeMany([a[pkField]], () => {}, rid);
      await frames.next('subscribe_many reply');

      await create(); // not followed: no create event
      await withTimeout(client.patch(stream, b[pkField], { counter: 1 }), 'patch b');
      await withTimeout(client.patch(stream, a[pkField], { counter: 2 }), 'patch a');
      const frame = await frames.next('update event of the followed thing');
      assert.equal(frame.payload.action, 'update');
      assert.deepEqual(frame.payload.data, thing(a[pkField], a.name, 2));
      // The events of the earlier create and patch of b were handled before this one, and any
      // other push of this one arrives before the reply.
      await roundTrip(client, stream, a[pkField]);
      assert.deepEqual(frames.items, [], 'events for things not listed were pushed');
    });

    it('stops the events after unsubscribe_many with the same request id', async () => {
      const rid = `many-${uniqueName()}`;
      const events = new Inbox('events of the cancelled subscription');
      const sentinel = new Inbox('events of the sentinel subscription');
      await subscribeMany(null, events.push, rid);
      await subscribeMany(null, sentinel.push, `sentinel-${uniqueName()}`);

      const replies = listenFrames(client, {
        stream,
        payload: { action: 'unsubscribe_many', request_id: rid },
      });
      const result = await withTimeout(
        client.request(stream, { action: 'unsubscribe_many' }, rid),
        'unsubscribe_many reply',
      );
      assert.equal(result, null);
      assert.equal((await replies.next('unsubscribe_many frame')).payload.response_status, 204);

      const created = await create();
      const pk = created[pkField];
      await withTimeout(client.patch(stream, pk, { counter: 5 }), 'patch reply');
      const [data] = await sentinel.take(([d]) => d[pkField] === pk, 'sentinel update event');
      assert.deepEqual(data, thing(pk, created.name, 5));
      // A push of the same event to the cancelled request id would arrive before this reply.
      await roundTrip(client, stream, pk);
      assert.deepEqual(events.items, [], 'the unsubscribed request id still received events');
    });
  });
}

'use strict';
// Custom actions with caller-chosen request ids (`client.request`) on the `echo` stream,
// `whoami` anonymous and with a JWT, and the multiplexer's unknown-stream reply.

const assert = require('node:assert/strict');
const { after, afterEach, before, beforeEach, describe, it } = require('node:test');

const {
  closeClients,
  connectClient,
  hs256Token,
  listenFrames,
  rejectionOf,
  startServer,
  uniqueName,
  withTimeout,
} = require('../support/harness');

describe('echo stream and multiplexer', () => {
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

  it('echoes the fields with a caller-chosen string request id', async () => {
    const frames = listenFrames(client, { stream: 'echo', payload: { request_id: 'my-own-id' } });
    const data = await withTimeout(
      client.request('echo', { action: 'echo', extra: 1 }, 'my-own-id'),
      'echo reply',
    );
    assert.deepEqual(data, { extra: 1 });
    assert.deepEqual(await frames.next('echo reply frame'), {
      stream: 'echo',
      payload: {
        errors: [],
        data: { extra: 1 },
        action: 'echo',
        response_status: 200,
        request_id: 'my-own-id',
      },
    });
  });

  for (const rid of [42, 0, -7, 2 ** 40]) {
    it(`echoes a numeric request id as a number (${rid})`, async () => {
      const frames = listenFrames(client, { stream: 'echo', payload: { action: 'echo' } });
      // The client matches replies with a strict partial match: "42" would not match 42.
      const data = await withTimeout(
        client.request('echo', { action: 'echo', n: rid }, rid),
        `echo reply to request id ${rid}`,
      );
      assert.deepEqual(data, { n: rid });
      const frame = await frames.next('echo reply frame');
      assert.equal(typeof frame.payload.request_id, 'number');
      assert.equal(frame.payload.request_id, rid);
    });
  }

  it('echoes nested JSON unchanged', async () => {
    const fields = {
      text: 'zürich ✓ "quoted" \\ back\nslash',
      list: [1, 2.5, -3, null, true, false, 'x', { deep: [[]] }],
      object: { a: { b: { c: {} } }, empty: '' },
      big: 9007199254740991,
    };
    const data = await withTimeout(
      client.request('echo', { action: 'echo', ...fields }, `nested-${uniqueName()}`),
      'echo reply',
    );
    assert.deepEqual(data, fields);
  });

  it('routes many concurrent replies by request id', async () => {
    const ids = Array.from({ length: 30 }, (_, i) => `burst-${i}-${uniqueName()}`);
    const replies = await withTimeout(
      Promise.all(ids.map((id, i) => client.request('echo', { action: 'echo', i }, id))),
      'thirty echo replies',
    );
    assert.deepEqual(
      replies,
      ids.map((_, i) => ({ i })),
    );
  });

  it('whoami is null for an anonymous connection', async () => {
    const rid = `whoami-${uniqueName()}`;
    const frames = listenFrames(client, { stream: 'echo', payload: { request_id: rid } });
    assert.equal(
      await withTimeout(client.request('echo', { action: 'whoami' }, rid), 'whoami reply'),
      null,
    );
    const frame = await frames.next('whoami reply frame');
    assert.equal(frame.payload.action, 'whoami');
    assert.equal(frame.payload.response_status, 200);
  });

  it('whoami returns the user of a ?token= JWT', async () => {
    const token = hs256Token({
      sub: '42',
      username: 'alice',
      exp: Math.floor(Date.now() / 1000) + 600,
    });
    const authed = await connectClient(`${server.url}?token=${encodeURIComponent(token)}`);
    clients.push(authed);
    const user = await withTimeout(
      authed.request('echo', { action: 'whoami' }, `whoami-${uniqueName()}`),
      'whoami reply',
    );
    assert.equal(user.id, '42');
    assert.equal(user.username, 'alice');
  });

  it('rejects an unknown action with 405', async () => {
    const rid = `nope-${uniqueName()}`;
    const rejection = await rejectionOf(
      client.request('echo', { action: 'nope' }, rid),
      'unknown action rejection',
    );
    assert.deepEqual(rejection, {
      errors: ['Method "nope" not allowed.'],
      data: null,
      action: 'nope',
      response_status: 405,
      request_id: rid,
    });
  });

  it('rejects an unknown stream with 404, on that stream, and the socket stays usable', async () => {
    const rid = `unknown-${uniqueName()}`;
    const rejection = await rejectionOf(
      client.request('nope', { action: 'list', data: {} }, rid),
      'unknown stream rejection',
    );
    assert.deepEqual(rejection.errors, ['Unknown stream "nope".']);
    assert.equal(rejection.response_status, 404);
    assert.equal(rejection.request_id, rid);
    // The same connection still serves the known streams.
    assert.deepEqual(
      await withTimeout(client.request('echo', { action: 'echo', ok: true }), 'echo reply'),
      { ok: true },
    );
  });

  it('serves several streams interleaved on one socket', async () => {
    const [echoed, things, todos] = await withTimeout(
      Promise.all([
        client.request('echo', { action: 'echo', k: 'v' }),
        client.create('things', { name: uniqueName() }),
        client.create('todos', { title: uniqueName('todo') }),
      ]),
      'replies from three streams',
    );
    assert.deepEqual(echoed, { k: 'v' });
    assert.equal(typeof things.pk, 'number');
    assert.equal(typeof todos.id, 'number');
  });
});

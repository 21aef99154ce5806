'use strict';
// list / create / retrieve / update / patch / delete and the error replies, through the real
// dcrf-client, on both representations of the `thing` table.

const assert = require('node:assert/strict');
const { after, afterEach, before, beforeEach, describe, it } = require('node:test');

const {
  FRESH_DATABASE,
  THING_STREAMS,
  byKey,
  closeClients,
  connectClient,
  rejectionOf,
  startServer,
  uniqueName,
  withTimeout,
} = require('../support/harness');

const MISSING_PK = 2147480000;

for (const { stream, pkField } of THING_STREAMS) {
  describe(`${stream} (pkField "${pkField}")`, () => {
    let server;
    let client;
    const clients = [];
    const thing = (pk, name, counter = 0) => ({ [pkField]: pk, name, counter });

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

    describe('list', () => {
      // Runs before anything in this group creates a row: the server's database is new.
      it('returns empty set', { skip: !FRESH_DATABASE && 'shared database' }, async () => {
        const things = await withTimeout(client.list(stream), 'list reply');
        assert.deepEqual(things, []);
      });

      it('returns created rows', async () => {
        const before = await withTimeout(client.list(stream), 'list reply (before)');
        const rows = [
          { name: uniqueName('max') },
          { name: uniqueName('mary'), counter: 1 },
          { name: uniqueName('unique'), counter: 1337 },
        ];
        // Three creates in flight at once, as the client's own test does.
        const created = await withTimeout(
          Promise.all(rows.map((row) => client.create(stream, row))),
          'three create replies',
        );
        for (const [i, row] of rows.entries()) {
          assert.deepEqual(created[i], thing(created[i][pkField], row.name, row.counter ?? 0));
        }
        const things = await withTimeout(client.list(stream), 'list reply (after)');
        assert.ok(Array.isArray(things), `list data is not an array: ${JSON.stringify(things)}`);
        for (const row of created) {
          assert.deepEqual(
            things.find((t) => t[pkField] === row[pkField]),
            row,
            `created row ${JSON.stringify(row)} missing from list`,
          );
        }
        if (FRESH_DATABASE) {
          const expected = [...before, ...created].sort(byKey(pkField));
          assert.deepEqual([...things].sort(byKey(pkField)), expected);
        }
      });
    });

    describe('create', () => {
      it('returns created values', async () => {
        const name = uniqueName();
        const created = await withTimeout(client.create(stream, { name }), 'create reply');
        assert.equal(typeof created[pkField], 'number', `no numeric "${pkField}" in create reply`);
        assert.deepEqual(created, thing(created[pkField], name, 0));
      });

      it('imbues retrieve with data', async () => {
        const name = uniqueName();
        const created = await withTimeout(
          client.create(stream, { name, counter: 5 }),
          'create reply',
        );
        const retrieved = await withTimeout(
          client.retrieve(stream, created[pkField]),
          'retrieve reply',
        );
        assert.deepEqual(retrieved, thing(created[pkField], name, 5));
      });

      it('rejects invalid data with 400 and field errors', async () => {
        const rid = `invalid-${uniqueName()}`;
        const missing = await rejectionOf(client.create(stream, {}, rid), 'create {} rejection');
        assert.deepEqual(missing, {
          errors: [{ name: ['This field is required.'] }],
          data: null,
          action: 'create',
          response_status: 400,
          request_id: rid,
        });

        const blank = await rejectionOf(client.create(stream, { name: '' }), 'blank name');
        assert.equal(blank.response_status, 400);
        assert.deepEqual(blank.errors, [{ name: ['This field may not be blank.'] }]);

        const long = await rejectionOf(
          client.create(stream, { name: 'x'.repeat(65) }),
          'too long name',
        );
        assert.equal(long.response_status, 400);
        assert.deepEqual(long.errors, [
          { name: ['Ensure this field has no more than 64 characters.'] },
        ]);

        const mistyped = await rejectionOf(
          client.create(stream, { name: uniqueName(), counter: 'many' }),
          'mistyped counter',
        );
        assert.equal(mistyped.response_status, 400);
        assert.equal(mistyped.action, 'create');
        assert.equal(mistyped.data, null);
        assert.ok(
          Array.isArray(mistyped.errors) &&
            mistyped.errors.length === 1 &&
            Array.isArray(mistyped.errors[0].counter) &&
            mistyped.errors[0].counter.every((m) => typeof m === 'string'),
          `expected errors [{counter: [messages]}], got ${JSON.stringify(mistyped.errors)}`,
        );
      });
    });

    describe('retrieve', () => {
      it('rejects a missing pk with the whole 404 payload', async () => {
        const rid = `missing-${uniqueName()}`;
        const rejection = await rejectionOf(
          client.retrieve(stream, MISSING_PK, {}, rid),
          'retrieve rejection',
        );
        assert.deepEqual(rejection, {
          errors: ['Not found'],
          data: null,
          action: 'retrieve',
          response_status: 404,
          request_id: rid,
        });
      });
    });

    describe('update', () => {
      it('replaces the fields and returns the object', async () => {
        const created = await withTimeout(
          client.create(stream, { name: uniqueName(), counter: 3 }),
          'create reply',
        );
        const pk = created[pkField];
        const name = uniqueName('renamed');
        const updated = await withTimeout(
          client.update(stream, pk, { name, counter: 7 }),
          'update reply',
        );
        assert.deepEqual(updated, thing(pk, name, 7));
        assert.deepEqual(
          await withTimeout(client.retrieve(stream, pk), 'retrieve reply'),
          thing(pk, name, 7),
        );
      });

      it('keeps an omitted optional field (DRF full update semantics)', async () => {
        const created = await withTimeout(
          client.create(stream, { name: uniqueName(), counter: 9 }),
          'create reply',
        );
        const pk = created[pkField];
        const name = uniqueName('renamed');
        const updated = await withTimeout(client.update(stream, pk, { name }), 'update reply');
        assert.deepEqual(updated, thing(pk, name, 9));
      });

      it('rejects a missing pk with 404', async () => {
        const rejection = await rejectionOf(
          client.update(stream, MISSING_PK, { name: uniqueName() }),
          'update rejection',
        );
        assert.equal(rejection.response_status, 404);
        assert.equal(rejection.action, 'update');
        assert.deepEqual(rejection.errors, ['Not found']);
      });
    });

    describe('patch', () => {
      it('changes only the given fields', async () => {
        const name = uniqueName();
        const created = await withTimeout(
          client.create(stream, { name, counter: 1 }),
          'create reply',
        );
        const pk = created[pkField];
        const patched = await withTimeout(client.patch(stream, pk, { counter: 5 }), 'patch reply');
        assert.deepEqual(patched, thing(pk, name, 5));
        assert.deepEqual(
          await withTimeout(client.retrieve(stream, pk), 'retrieve reply'),
          thing(pk, name, 5),
        );
      });
    });

    describe('delete', () => {
      it('resolves null and removes the row', async () => {
        const created = await withTimeout(
          client.create(stream, { name: uniqueName() }),
          'create reply',
        );
        const pk = created[pkField];
        assert.equal(await withTimeout(client.delete(stream, pk), 'delete reply'), null);
        const gone = await rejectionOf(client.retrieve(stream, pk), 'retrieve after delete');
        assert.equal(gone.response_status, 404);
        const again = await rejectionOf(client.delete(stream, pk), 'second delete');
        assert.equal(again.response_status, 404);
        assert.deepEqual(again.errors, ['Not found']);
      });
    });

    describe('unknown action', () => {
      it('rejects with 405 Method "x" not allowed.', async () => {
        const rid = `nope-${uniqueName()}`;
        const rejection = await rejectionOf(
          client.request(stream, { action: 'nope', extra: 1 }, rid),
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
    });
  });
}

import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { upgradeStatus } from '../helpers/accounts.js';
import { api, cleanup, qemusOf, root, startDaemon, type TestDaemon } from '../helpers/daemon.js';

describe('bad input gets a clear error and changes nothing', () => {
  let d: TestDaemon;
  let id: string;
  before(async () => {
    d = await startDaemon();
    id = String((await api(d.url, 'POST', '/v1/machines', { ttl_seconds: 600 })).body.id);
  });
  after(async () => cleanup(d));

  const cases: [string, string, string, unknown, string | undefined, number, string][] = [
    ['unknown template', 'POST', '/v1/machines', { template: 'cobol' }, undefined, 404, 'TEMPLATE_NOT_FOUND'],
    [
      'ttl of the wrong type',
      'POST',
      '/v1/machines',
      { ttl_seconds: 'soon' },
      undefined,
      400,
      'INVALID_ARGUMENT',
    ],
    ['malformed JSON', 'POST', '/v1/machines', undefined, '{"template":', 400, 'INVALID_JSON'],
    ['unknown field', 'POST', '/v1/machines', { tempalte: 'python' }, undefined, 400, 'INVALID_ARGUMENT'],
    ['bad name', 'POST', '/v1/machines', { name: 'Not A Name' }, undefined, 400, 'INVALID_ARGUMENT'],
    [
      'egress rules without a network',
      'POST',
      '/v1/machines',
      { egress: { allow: ['pypi.org'] } },
      undefined,
      400,
      'INVALID_ARGUMENT',
    ],
    [
      'egress rules that are not rules',
      'POST',
      '/v1/machines',
      { net: true, egress: { allow: ['not a name'] } },
      undefined,
      400,
      'INVALID_ARGUMENT',
    ],
    ['unknown id (GET)', 'GET', '/v1/machines/m-00000000', undefined, undefined, 404, 'MACHINE_NOT_FOUND'],
    [
      'unknown id (DELETE)',
      'DELETE',
      '/v1/machines/m-00000000',
      undefined,
      undefined,
      404,
      'MACHINE_NOT_FOUND',
    ],
    [
      'unknown id (exec)',
      'POST',
      '/v1/machines/m-00000000/exec',
      { cmd: ['true'] },
      undefined,
      404,
      'MACHINE_NOT_FOUND',
    ],
    ['unknown route', 'GET', '/v1/nothing', undefined, undefined, 404, 'ROUTE_NOT_FOUND'],
    ['wrong method', 'PUT', '/v1/machines', undefined, undefined, 405, 'METHOD_NOT_ALLOWED'],
  ];
  for (const [name, method, path, body, raw, status, code] of cases) {
    test(name, async () => {
      const before = (await api(d.url, 'GET', '/v1/machines')).body;
      const r = await api(d.url, method, path, body, raw);
      assert.equal(r.status, status, JSON.stringify(r.body));
      assert.equal(r.body.code, code);
      assert.equal(typeof r.body.message, 'string');
      assert.ok(String(r.body.message).length > 5);
      assert.deepEqual((await api(d.url, 'GET', '/v1/machines')).body, before);
      assert.equal(qemusOf(d.stateDir).length, 1);
    });
  }

  test('exec: missing cmd, empty argv, wrong types', async () => {
    for (const body of [
      {},
      { cmd: [] },
      { cmd: [1, 2] },
      { cmd: ['true'], timeout_ms: -1 },
      { cmd: ['true'], env: { A: 1 } },
    ]) {
      const r = await api(d.url, 'POST', `/v1/machines/${id}/exec`, body);
      assert.equal(r.status, 400, JSON.stringify(body));
      assert.equal(r.body.code, 'INVALID_ARGUMENT');
    }
    const r = await api(d.url, 'POST', `/v1/machines/${id}/exec`, undefined, 'not json');
    assert.equal(r.body.code, 'INVALID_JSON');
  });

  test('a duplicate name is refused with 409', async () => {
    const a = await api(d.url, 'POST', '/v1/machines', { name: 'dup' });
    assert.equal(a.status, 201);
    const b = await api(d.url, 'POST', '/v1/machines', { name: 'dup' });
    assert.equal(b.status, 409);
    assert.equal(b.body.code, 'NAME_TAKEN');
    await api(d.url, 'DELETE', '/v1/machines/dup');
  });

  test('a web page without a token is refused on the loopback listener, and changes nothing', async () => {
    const before = (await api(d.url, 'GET', '/v1/machines')).body;
    const send = async (method: string, path: string, headers: Record<string, string>, body?: unknown) => {
      const r = await fetch(new URL(path, d.url), {
        method,
        headers: { ...headers, 'content-type': 'application/json' },
        body: body === undefined ? null : JSON.stringify(body),
      });
      return { status: r.status, code: ((await r.json()) as { code?: string }).code };
    };
    const refused = { status: 401, code: 'UNAUTHENTICATED' };
    const evil = { origin: 'http://evil.example' };
    assert.deepEqual(await send('POST', '/v1/machines', evil, { ttl_seconds: 60 }), refused);
    assert.deepEqual(
      await send('DELETE', `/v1/machines/${id}`, { 'sec-fetch-site': 'same-origin' }),
      refused,
    );
    assert.deepEqual(
      await send('POST', `/v1/machines/${id}/exec`, { 'sec-fetch-site': 'cross-site' }, { cmd: ['true'] }),
      refused,
    );
    assert.deepEqual((await api(d.url, 'GET', '/v1/machines')).body, before);
    assert.equal(qemusOf(d.stateDir).length, 1);
    // The user's own navigation (address bar) is served, as curl is.
    const nav = await fetch(new URL('/v1/machines', d.url), { headers: { 'sec-fetch-site': 'none' } });
    assert.equal(nav.status, 200);

    const tty = `${d.url.replace('http', 'ws')}/v1/machines/${id}/tty`;
    const upgrade = (origin: string): Promise<number> => upgradeStatus(tty, { origin });
    assert.equal(await upgrade('http://evil.example'), 401, "another site's page opens no terminal");
    // Non-browser clients that send the target's own Origin (python's websocket-client) still work.
    assert.equal(await upgrade(new URL(d.url).origin), 101);
  });

  test('/openapi.json is served and matches the checked-in spec/openapi.json', async () => {
    const served = await (await fetch(new URL('/openapi.json', d.url))).json();
    const checkedIn = JSON.parse(readFileSync(join(root, 'spec', 'openapi.json'), 'utf8'));
    assert.deepEqual(served, checkedIn);
  });
});

// What a member sends is bounded (issue 20): a /metrics page past MAX_METRICS_BYTES is cut off, a
// quota that no etcd could have is not taken, and a member URL that would downgrade TLS is not used. Real HTTP servers on loopback stand in for members.
import assert from 'node:assert/strict';
import { createServer, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { after, describe, it } from 'node:test';
import { MAX_METRICS_BYTES, MemberClient, MetricsPageError, parseServerMetrics, type Access } from '../../src/etcd.ts';
import { DefragdError } from '../../src/errors.ts';

const access: Access = { requestTimeout: 10_000, defragTimeout: 60_000, retry: { attempts: 1, minDelay: 10, maxDelay: 10 } };

/** A plain-http "member" whose /metrics is served by `page`; resolves to its URL. */
async function member(page: (res: ServerResponse) => void): Promise<{ url: string; server: Server; closed: Promise<void> }> {
  let closedResolve!: () => void;
  const closed = new Promise<void>((r) => (closedResolve = r));
  const server = createServer((req, res) => {
    req.socket.on('close', () => closedResolve());
    page(res);
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  return { url: `http://127.0.0.1:${(server.address() as AddressInfo).port}`, server, closed };
}

describe('a member /metrics page is bounded', () => {
  const servers: Server[] = [];
  const clients: MemberClient[] = [];
  after(() => {
    for (const c of clients) c.close();
    for (const s of servers) s.closeAllConnections();
    for (const s of servers) s.close();
  });
  const client = (url: string) => {
    const c = new MemberClient(url, access);
    clients.push(c);
    return c;
  };

  it('an endless page (no length given) is cut off just past the limit, and the member is told so by a closed connection', async () => {
    let sent = 0;
    const chunk = Buffer.alloc(64 * 1024, 'etcd_padding_metric 1\n');
    const m = await member((res) => {
      res.writeHead(200, { 'content-type': 'text/plain' });
      const pump = () => {
        // Writes until the socket is gone: the body would never end on its own.
        while (!res.destroyed && res.write(chunk)) sent += chunk.length;
        if (!res.destroyed) res.once('drain', pump);
      };
      res.on('close', () => undefined);
      pump();
    });
    servers.push(m.server);
    const rss = process.memoryUsage().rss;
    const started = Date.now();
    await assert.rejects(client(m.url).serverMetrics(), (e: unknown) => {
      assert.ok(e instanceof MetricsPageError, String(e));
      assert.match(e.message, new RegExp(`^metrics on ${m.url}: the page is longer, over the ${MAX_METRICS_BYTES}-byte limit; cut off$`));
      return true;
    });
    await m.closed;
    assert.ok(Date.now() - started < 5_000, 'cut off at once, not at the request deadline');
    assert.ok(sent < MAX_METRICS_BYTES * 4, `the member got to send ${sent} bytes only`);
    assert.ok(process.memoryUsage().rss - rss < 64 * 1024 * 1024, 'memory did not follow the page');
  });

  it('a page that declares a length over the limit is refused before its body is read', async () => {
    const m = await member((res) => {
      res.writeHead(200, { 'content-length': String(512 * 1024 * 1024) });
      res.write('etcd_disk_defrag_inflight 0\n');
    });
    servers.push(m.server);
    await assert.rejects(client(m.url).serverMetrics(), /the page is 536870912 bytes long, over the \d+-byte limit; cut off/);
    await m.closed;
  });

  it('a page just under the limit is still read', async () => {
    const tail = 'etcd_server_quota_backend_bytes 2.147483648e+09\netcd_disk_defrag_inflight 0\n';
    const m = await member((res) => {
      res.writeHead(200);
      res.end('#'.repeat(MAX_METRICS_BYTES - tail.length - 1) + '\n' + tail);
    });
    servers.push(m.server);
    assert.deepEqual(await client(m.url).serverMetrics(), { quotaBytes: 2 ** 31, defragInflight: false });
  });
});

describe('a quota etcd could not have is not taken', () => {
  for (const raw of ['0', '-1', '-8.589934592e+09', '1e308', '+Inf', 'NaN', '0.5', '1.5e+300'])
    it(`etcd_server_quota_backend_bytes ${raw}`, () => {
      const m = parseServerMetrics(`etcd_server_quota_backend_bytes ${raw}\netcd_disk_defrag_inflight 0\n`);
      assert.equal(m.quotaBytes, undefined);
      assert.equal(m.quotaInvalid, raw);
      assert.equal(m.defragInflight, false, 'the rest of the page still counts');
    });
  it('a real one is', () => {
    assert.equal(parseServerMetrics('etcd_server_quota_backend_bytes 8.589934592e+09\n').quotaBytes, 8 * 2 ** 30);
  });
});

describe('with etcd.endpoint on https://, a member advertising http:// gets nothing', () => {
  it('every call is refused with EDD_TLS naming the URL, and no connection is made', async () => {
    let connections = 0;
    const server = createServer((_req, res) => res.end('etcd_disk_defrag_inflight 0\n'));
    server.on('connection', () => connections++);
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    const url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
    const c = new MemberClient(url, { ...access, tls: true, username: 'root', password: 'secret' });
    try {
      const refused = (e: unknown) => {
        assert.ok(e instanceof DefragdError, String(e));
        assert.equal(e.code, 'EDD_TLS');
        assert.match(e.message, new RegExp(`^member URL ${url} is not https:// while etcd\\.endpoint is: refused`));
        assert.match(e.message, /accepted: https:\/\/ client URLs/);
        return true;
      };
      await assert.rejects(c.status(), refused);
      await assert.rejects(c.serverMetrics(), refused);
      await assert.rejects(c.put('/k', 'v'), refused);
      await assert.rejects(c.defragment(), refused);
      refused(await c.probe(1_000));
      assert.equal(connections, 0);
      // The same URL is fine when the configured endpoint is plain http too.
      assert.deepEqual(await new MemberClient(url, access).serverMetrics(), { defragInflight: false });
      assert.equal(connections, 1);
    } finally {
      c.close();
      server.close();
    }
  });
});

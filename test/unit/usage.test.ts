// `usage`: how keys are grouped into prefixes, how pages add up, and how the scan pages through a
// keyspace (a moving start key, a page halved when the client refuses it as too large).
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import type { Clock } from '../../src/clock.ts';
import { UsageError } from '../../src/errors.ts';
import { createLogger } from '../../src/log.ts';
import {
  OTHER_PREFIX,
  UsageTally,
  parseDepth,
  prefixLength,
  resourceOf,
  scanUsage,
  usageText,
  type KeyValueLike,
  type UsageClient,
} from '../../src/usage.ts';
import type { MemberStatus } from '../../src/view.ts';

const prefixOf = (key: string, depth = 2) => key.slice(0, prefixLength(Buffer.from(key), depth));

const kv = (key: string, valueBytes: number, version = 1, modRevision = 1): KeyValueLike => ({
  key: Buffer.from(key),
  value: Buffer.alloc(valueBytes),
  version: String(version),
  mod_revision: String(modRevision),
});

describe('usage: prefixes', () => {
  it('groups Kubernetes keys by resource, and by group and resource when the first segment names an API group', () => {
    const cases: [string, string][] = [
      ['/registry/events/default/nginx.17a2b', '/registry/events/'],
      ['/registry/pods/kube-system/etcd-cp-1', '/registry/pods/'],
      ['/registry/ranges/serviceips', '/registry/ranges/'],
      ['/registry/wgpolicyk8s.io/policyreports/default/polr-ns-default', '/registry/wgpolicyk8s.io/policyreports/'],
      [
        '/registry/apiextensions.k8s.io/customresourcedefinitions/policyreports.wgpolicyk8s.io',
        '/registry/apiextensions.k8s.io/customresourcedefinitions/',
      ],
      ['/registry/apiregistration.k8s.io/apiservices/v1.apps', '/registry/apiregistration.k8s.io/apiservices/'],
      ['/registry/example.com/widgets', '/registry/example.com/'],
      ['/registry/health', '/registry/'],
    ];
    for (const [key, prefix] of cases) assert.equal(prefixOf(key), prefix, key);
    // --depth does not change Kubernetes grouping.
    assert.equal(prefixOf('/registry/wgpolicyk8s.io/policyreports/ns/r', 1), '/registry/wgpolicyk8s.io/policyreports/');
    assert.equal(prefixOf('/registry/events/ns/e', 5), '/registry/events/');
  });

  it('groups other keys by their first --depth segments, never by the key itself', () => {
    const cases: [string, number, string][] = [
      ['/etcd-defragd/p/7f3a/1', 2, '/etcd-defragd/p/'],
      ['/etcd-defragd/p/7f3a/1', 1, '/etcd-defragd/'],
      ['/etcd-defragd/p/7f3a/1', 3, '/etcd-defragd/p/7f3a/'],
      ['/etcd-defragd/pause', 2, '/etcd-defragd/'],
      ['/a/b/c/d', 16, '/a/b/c/'],
      ['app/config/x', 1, 'app/'],
      ['/flat', 2, '/'],
      ['compact_rev_key', 2, ''],
      ['/registry', 2, '/'],
    ];
    for (const [key, depth, prefix] of cases) assert.equal(prefixOf(key, depth), prefix, `${key} at depth ${depth}`);
  });

  it('names a resource as kubectl does: resource.group', () => {
    assert.equal(resourceOf('/registry/events/'), 'events');
    assert.equal(resourceOf('/registry/wgpolicyk8s.io/policyreports/'), 'policyreports.wgpolicyk8s.io');
    assert.equal(resourceOf('/registry/example.com/'), undefined, 'a group without its resource');
    assert.equal(resourceOf('/registry/'), undefined);
    assert.equal(resourceOf('/etcd-defragd/p/'), undefined);
  });

  it('--depth: a whole number from 1 to 16, else a usage error naming the flag, the value and what is accepted', () => {
    assert.equal(parseDepth(undefined), 2);
    assert.equal(parseDepth('1'), 1);
    assert.equal(parseDepth('16'), 16);
    for (const bad of ['0', '17', 'two', '2.5', '-1', '', '99999999']) {
      assert.throws(
        () => parseDepth(bad),
        (err: unknown) =>
          err instanceof UsageError &&
          err.message.startsWith(`--depth: ${JSON.stringify(bad)} is `) &&
          err.message.includes('accepted: a whole number from 1 to 16 (default 2)'),
        bad,
      );
    }
  });
});

describe('usage: totals', () => {
  /** The seed's shape: many small events, fewer but larger Kyverno policy reports, a few other keys. */
  function pages(): KeyValueLike[][] {
    const all: KeyValueLike[] = [];
    for (let i = 0; i < 300; i++) all.push(kv(`/registry/events/default/ev-${String(i).padStart(4, '0')}`, 200, 1, 1000 + i));
    for (let i = 0; i < 20; i++) all.push(kv(`/registry/wgpolicyk8s.io/policyreports/ns-${i}/polr`, 20_000, 50, 100));
    all.push(kv('/registry/pods/kube-system/etcd-cp-1', 3000, 4, 20));
    all.push(kv('compact_rev_key', 5, 900, 9990));
    all.sort((a, b) => Buffer.compare(a.key, b.key));
    const out: KeyValueLike[][] = [];
    for (let i = 0; i < all.length; i += 37) out.push(all.slice(i, i + 37));
    return out;
  }

  it('ranks by bytes, counts keys, key and value bytes, versions and recent writes; names the dominant resource', () => {
    const t = new UsageTally(2, { recentRevisions: 1000 });
    for (const p of pages()) t.add(p, 10_000n);
    const r = t.totals();
    assert.deepEqual(
      r.prefixes.map((p) => p.prefix),
      ['/registry/wgpolicyk8s.io/policyreports/', '/registry/events/', '/registry/pods/', ''],
    );
    const [reports, events] = r.prefixes;
    assert.equal(reports!.keys, 20);
    assert.equal(events!.keys, 300, 'events have more keys, yet rank second: fewer bytes');
    assert.equal(reports!.valueBytes, 20 * 20_000);
    assert.equal(
      reports!.keyBytes,
      [...Array(20).keys()].reduce((n, i) => n + `/registry/wgpolicyk8s.io/policyreports/ns-${i}/polr`.length, 0),
    );
    assert.equal(reports!.bytes, reports!.keyBytes + reports!.valueBytes);
    assert.equal(reports!.resource, 'policyreports.wgpolicyk8s.io');
    assert.equal(reports!.avgVersion, 50);
    assert.equal(reports!.recentKeys, 0, 'last written at revision 100, 9,900 revisions ago');
    assert.equal(events!.recentKeys, 0);
    assert.equal(r.prefixes[3]!.recentKeys, 1, 'compact_rev_key was written 10 revisions ago');
    assert.equal(r.keys, 322);
    assert.equal(
      r.bytes,
      r.prefixes.reduce((n, p) => n + p.bytes, 0),
    );
    assert.equal(r.revision, 10_000n);
    assert.equal(r.dominant?.resource, 'policyreports.wgpolicyk8s.io');
    assert.ok(r.dominant!.share > 0.5 && r.dominant!.share < 1);
    assert.equal(r.truncated, false);
  });

  it('gives the same totals however the keys are split into pages', () => {
    const one = new UsageTally(2);
    one.add(pages().flat(), 5000n);
    const many = new UsageTally(2);
    for (const p of pages()) many.add(p, 5000n);
    assert.deepEqual(many.totals(), one.totals());
  });

  it('recent writes are judged against the revision each page was read at', () => {
    const t = new UsageTally(2, { recentRevisions: 100 });
    t.add([kv('/a/b/1', 1, 1, 950)], 1000n);
    t.add([kv('/a/b/2', 1, 1, 950)], 2000n);
    assert.equal(t.totals().prefixes[0]!.recentKeys, 1);
    assert.equal(t.totals().revision, 2000n);
  });

  it('names no resource when none holds over half the bytes', () => {
    const t = new UsageTally(2);
    t.add([kv('/registry/events/a', 100), kv('/registry/pods/a', 100), kv('/other/x/y', 100)], 1n);
    assert.equal(t.totals().dominant, undefined);
  });

  it('keeps at most maxPrefixes prefixes; the rest are counted, under one more', () => {
    const t = new UsageTally(2, { maxPrefixes: 3 });
    t.add(
      [...Array(10).keys()].map((i) => kv(`/tenant-${i}/data/x`, 10)),
      1n,
    );
    const r = t.totals();
    assert.equal(r.truncated, true);
    assert.equal(r.prefixes.length, 4);
    assert.equal(r.prefixes.find((p) => p.prefix === OTHER_PREFIX)?.keys, 7);
    assert.equal(r.keys, 10);
  });

  it('keeps prefixes that differ only in bytes that are not UTF-8 apart', () => {
    const t = new UsageTally(1);
    t.add([{ ...kv('', 1), key: Buffer.from([0x2f, 0xff, 0x2f, 0x61]) }], 1n);
    t.add([{ ...kv('', 1), key: Buffer.from([0x2f, 0xfe, 0x2f, 0x61]) }], 1n);
    assert.equal(t.totals().prefixes.length, 2);
  });

  it('the text ends with the dominant resource, the way the seed would have shown it', () => {
    const t = new UsageTally(2);
    for (const p of pages()) t.add(p, 10_000n);
    const text = usageText({
      ...t.totals(),
      source: { endpoint: 'https://10.0.0.2:2379', memberId: 'abc', name: 'cp-2', role: 'follower', why: 'a voting follower' },
      pages: 9,
      durationMs: 1200,
      recentRevisions: 10_000,
    });
    const lines = text.split('\n');
    assert.match(lines[0]!, /^PREFIX\s+KEYS\s+BYTES\s+SHARE\s+AVG VERSION\s+RECENT$/);
    assert.match(lines[1]!, /^\/registry\/wgpolicyk8s\.io\/policyreports\/\s+20\s+/);
    assert.match(text, /^\(keys with no \/\)\s+1\s+/m);
    assert.match(text, /^total: 322 keys, .* at revision 10000, read from cp-2 abc \(follower, https:\/\/10\.0\.0\.2:2379\) in 9 pages/m);
    assert.match(lines.at(-1)!, /^most of the space is policyreports\.wgpolicyk8s\.io \(\d\d%\)$/);
  });
});

describe('usage: the scan', () => {
  const log = createLogger({ level: 'silent', format: 'json', env: {} });
  const status = (memberId: string, leader: string): MemberStatus => ({
    endpoint: '',
    memberId,
    leader,
    version: '3.5.30',
    dbSize: 0,
    dbSizeInUse: 0,
    raftIndex: 1n,
    raftAppliedIndex: 1n,
    raftTerm: 1n,
    revision: 1n,
    isLearner: false,
    errors: [],
  });
  /** Sleeps are counted, not waited. */
  const fakeClock = (): Clock & { sleeps: number[] } => {
    let t = 0;
    const sleeps: number[] = [];
    return {
      sleeps,
      now: () => (t += 5),
      sleep: async (ms) => {
        sleeps.push(ms);
        t += ms;
      },
      every: () => ({ cancel: () => undefined }),
    };
  };

  /** A member holding `keys` (sorted), answering pages like etcd; pages over maxKeys fail as grpc-js does. */
  function member(endpoint: string, id: string, leader: string, keys: KeyValueLike[], maxKeys = Infinity) {
    const asks: { start: string; limit: number }[] = [];
    const client: UsageClient = {
      endpoint,
      status: async () => status(id, leader),
      probe: async () => status(id, leader),
      members: async () => [
        { id: '1', name: 'm1', clientURLs: ['m1'], peerURLs: [], isLearner: false },
        { id: '2', name: 'm2', clientURLs: ['m2'], peerURLs: [], isLearner: false },
        { id: '3', name: 'm3', clientURLs: ['m3'], peerURLs: [], isLearner: true },
      ],
      rangePage: async (start, _end, limit) => {
        asks.push({ start: start.toString('latin1'), limit });
        if (limit > maxKeys) throw new Error('range page on m: Received message larger than max (5000000 vs 4194304)');
        const from = keys.filter((k) => Buffer.compare(k.key, start) >= 0);
        return { kvs: from.slice(0, limit) as never, revision: 100n, more: from.length > limit };
      },
    };
    return { client, asks };
  }

  const keys = [...Array(25).keys()].map((i) => kv(`/k/${String(i).padStart(2, '0')}/v`, 10));

  it('reads from a voting follower when the local member leads, moving the start key past each page, pausing between pages', async () => {
    const m1 = member('m1', '1', '1', []);
    const m2 = member('m2', '2', '1', keys);
    const clock = fakeClock();
    const pool = { get: (e: string) => (e === 'm1' ? m1.client : e === 'm2' ? m2.client : assert.fail(`asked ${e}`)) };
    const r = await scanUsage({ pool, endpoint: 'm1', log, clock, probeTimeoutMs: 100 }, { depth: 1, firstPageKeys: 10, pauseMs: 7 });
    assert.equal(r.source.endpoint, 'm2');
    assert.equal(r.source.role, 'follower');
    assert.equal(m1.asks.length, 0, 'nothing read from the leader');
    assert.deepEqual(
      m2.asks.map((a) => a.start),
      ['\0', '/k/09/v\0'],
      'the second page starts just past the last key of the first (and, small keys, takes the rest)',
    );
    assert.equal(r.keys, 25);
    assert.equal(r.prefixes[0]!.prefix, '/k/');
    assert.equal(clock.sleeps.length, r.pages - 1, 'a pause between pages, none after the last');
    assert.ok(clock.sleeps.every((ms) => ms === 7));
  });

  it('sizes the next page from the last one: a page of large values asks for fewer keys', async () => {
    const big = [...Array(40).keys()].map((i) => kv(`/b/${String(i).padStart(2, '0')}`, 1000));
    const m = member('m1', '1', '2', big);
    const pool = { get: () => m.client };
    const r = await scanUsage(
      { pool, endpoint: 'm1', log, clock: fakeClock(), probeTimeoutMs: 100 },
      { depth: 1, firstPageKeys: 10, pageTargetBytes: 5000 },
    );
    assert.equal(r.source.why, 'the local member, a voting follower');
    assert.equal(m.asks[1]!.limit, 4, '10 keys of ~1 KiB made 10 KiB; 5000 bytes is 4 such keys');
    assert.equal(r.keys, 40);
  });

  it('halves a page the client refuses as too large, goes on from the same key, and keeps the smaller size', async () => {
    const m = member('m1', '1', '2', keys, 3);
    const r = await scanUsage(
      { pool: { get: () => m.client }, endpoint: 'm1', log, clock: fakeClock(), probeTimeoutMs: 100 },
      { depth: 2, firstPageKeys: 12 },
    );
    assert.deepEqual(
      m.asks.slice(0, 4).map((a) => a.limit),
      [12, 6, 3, 3],
      'and no larger page is asked for again',
    );
    assert.equal(r.keys, 25);
  });

  it('falls back to the local member when no other voting follower answers', async () => {
    const m1 = member('m1', '1', '1', keys);
    const m2 = member('m2', '2', '1', []);
    m2.client.probe = async () => new Error('unavailable');
    const r = await scanUsage(
      { pool: { get: (e: string) => (e === 'm1' ? m1.client : m2.client) }, endpoint: 'm1', log, clock: fakeClock(), probeTimeoutMs: 100 },
      { depth: 2 },
    );
    assert.equal(r.source.endpoint, 'm1');
    assert.equal(r.source.role, 'leader');
    assert.match(r.source.why, /no other voting follower answered/);
    assert.equal(r.keys, 25);
  });
});

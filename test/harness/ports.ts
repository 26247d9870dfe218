/**
 * Free loopback ports for etcd members: random ports *below* the kernel's ephemeral range, so
 * outgoing connections can never grab them between our probe and etcd's bind. (A start that still
 * loses a race is retried by cluster.ts with fresh ports.)
 */
import { randomInt } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createServer, type Server } from 'node:net';

function ephemeralRange(): [number, number] {
  try {
    const [lo, hi] = readFileSync('/proc/sys/net/ipv4/ip_local_port_range', 'utf8').trim().split(/\s+/).map(Number);
    if (lo && hi) return [lo, hi];
  } catch {
    // not Linux
  }
  return [32768, 60999];
}

function listenOn(port: number): Promise<Server | undefined> {
  return new Promise((resolve) => {
    const s = createServer();
    s.once('error', () => resolve(undefined));
    s.listen({ port, host: '127.0.0.1', exclusive: true }, () => resolve(s));
  });
}

/**
 * Returns `n` distinct loopback ports that were free a moment ago. Candidates are random ports
 * below the ephemeral range (so the kernel does not hand them out as source ports of outgoing
 * connections); all are held open together while choosing, then released. Falls back to
 * port 0 when the range below is too small.
 */
export async function freePorts(n: number): Promise<number[]> {
  const [ephLo] = ephemeralRange();
  const lo = 10000;
  const hi = ephLo - 1;
  const held: Server[] = [];
  const ports: number[] = [];
  try {
    let attempts = 0;
    while (ports.length < n) {
      let port = 0;
      if (hi - lo > 1000 && attempts < n * 50) port = randomInt(lo, hi + 1);
      attempts++;
      if (port !== 0 && ports.includes(port)) continue;
      const s = await listenOn(port);
      if (!s) continue;
      held.push(s);
      const addr = s.address();
      if (addr && typeof addr === 'object') ports.push(addr.port);
    }
  } finally {
    await Promise.all(held.map((s) => new Promise<void>((r) => s.close(() => r()))));
  }
  return ports;
}

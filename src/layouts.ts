// Where each common control-plane layout keeps etcd's client TLS files and data dir, and the short
// config.yaml `init-config --layout` writes for it. The paths are each distribution's documented
// defaults at the time of writing (kubeadm's /etc/kubernetes/pki/etcd, RKE2's and k3s' server/tls/etcd
// and server/db/etcd, kubespray's /etc/ssl/etcd/ssl with certificates named after the node); a
// cluster installed with other paths needs the file edited. OpenShift is absent on purpose: its
// cluster-etcd-operator defragments already.

export const LAYOUTS = ['kubeadm', 'rke2', 'k3s', 'kubespray'] as const;
export type Layout = (typeof LAYOUTS)[number];

interface LayoutPaths {
  caFile: string;
  certFile: string;
  keyFile: string;
  dataDir: string;
  note: string;
}

function paths(layout: Layout, node: string): LayoutPaths {
  switch (layout) {
    case 'kubeadm':
      return {
        caFile: '/etc/kubernetes/pki/etcd/ca.crt',
        certFile: '/etc/kubernetes/pki/etcd/healthcheck-client.crt',
        keyFile: '/etc/kubernetes/pki/etcd/healthcheck-client.key',
        dataDir: '/var/lib/etcd',
        note: 'kubeadm: etcd as a static pod, client certificate made by kubeadm for health checks',
      };
    case 'rke2':
      return {
        caFile: '/var/lib/rancher/rke2/server/tls/etcd/server-ca.crt',
        certFile: '/var/lib/rancher/rke2/server/tls/etcd/client.crt',
        keyFile: '/var/lib/rancher/rke2/server/tls/etcd/client.key',
        dataDir: '/var/lib/rancher/rke2/server/db/etcd',
        note: 'RKE2: etcd as a static pod managed by rke2-server',
      };
    case 'k3s':
      return {
        caFile: '/var/lib/rancher/k3s/server/tls/etcd/server-ca.crt',
        certFile: '/var/lib/rancher/k3s/server/tls/etcd/client.crt',
        keyFile: '/var/lib/rancher/k3s/server/tls/etcd/client.key',
        dataDir: '/var/lib/rancher/k3s/server/db/etcd',
        note: 'k3s with embedded etcd (server --cluster-init); k3s on SQLite or kine has no etcd to defragment',
      };
    case 'kubespray':
      return {
        caFile: '/etc/ssl/etcd/ssl/ca.pem',
        certFile: `/etc/ssl/etcd/ssl/admin-${node}.pem`,
        keyFile: `/etc/ssl/etcd/ssl/admin-${node}-key.pem`,
        dataDir: '/var/lib/etcd',
        note: `kubespray, etcd_deployment_type: host (etcd.service); certificates are named after the inventory name, taken to be "${node}"`,
      };
  }
}

/** The short config.yaml for a layout: the keys that differ between layouts, everything else at its default. */
export function layoutConfig(layout: Layout, node: string): string {
  const p = paths(layout, node);
  return [
    `# etcd-defragd configuration for ${p.note}.`,
    '# Only what differs between layouts is set here; every other key keeps its default. The full',
    '# reference, every key commented with its default, is /usr/share/doc/etcd-defragd/config.reference.yaml.',
    '# Check a change with: etcd-defragd check-config',
    '',
    'etcd:',
    '  endpoint: "https://127.0.0.1:2379"',
    `  caFile: ${p.caFile}`,
    `  certFile: ${p.certFile}`,
    `  keyFile: ${p.keyFile}`,
    `  dataDir: ${p.dataDir}`,
    '',
    '# schedule:',
    '#   cron: "0 */3 * * *"   # minute hour day-of-month month day-of-week',
    '',
  ].join('\n');
}

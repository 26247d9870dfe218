// Validates deploy/kubernetes/*.yaml against the Kubernetes API schemas and checks what the
// manifests promise. The schemas: kubernetes-models (the OpenAPI schemas of the Kubernetes API
// compiled into validators) and @kubernetes-models/prometheus-operator (the CRD schemas of
// PodMonitor and PrometheusRule); kubeconform and kubeval are in neither npm nor Debian, and
// Debian's kubectl needs an API server to validate. These schemas, like the API's own OpenAPI,
// allow unknown fields, so the checks below name the fields that matter.
// deploy/kubernetes/prometheusrule.yaml wraps deploy/prometheus/etcd-defragd-rules.yaml:
//   node --import tsx scripts/validate-manifests.ts           check (CI)
//   node --import tsx scripts/validate-manifests.ts --write   regenerate prometheusrule.yaml first
import { readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { ConfigMap, Pod, Secret } from 'kubernetes-models/v1';
import { DaemonSet } from 'kubernetes-models/apps/v1';
import { PodMonitor, PrometheusRule } from '@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1';
import { parse, parseAllDocuments, stringify } from 'yaml';
import { parseDuration } from '../src/units.ts';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const dir = join(root, 'deploy', 'kubernetes');
const rulesFile = join(root, 'deploy', 'prometheus', 'etcd-defragd-rules.yaml');
const ruleFile = join(dir, 'prometheusrule.yaml');

type Obj = Record<string, any>; // eslint-disable-line @typescript-eslint/no-explicit-any
const MODELS: Record<string, new (data: never) => { validate(): void }> = {
  'v1/ConfigMap': ConfigMap,
  'v1/Pod': Pod,
  'v1/Secret': Secret,
  'apps/v1/DaemonSet': DaemonSet,
  'monitoring.coreos.com/v1/PodMonitor': PodMonitor,
  'monitoring.coreos.com/v1/PrometheusRule': PrometheusRule,
};

function prometheusRule(): string {
  const rules = parse(readFileSync(rulesFile, 'utf8')) as Obj;
  const doc = {
    apiVersion: 'monitoring.coreos.com/v1',
    kind: 'PrometheusRule',
    metadata: { name: 'etcd-defragd', namespace: 'kube-system', labels: { 'app.kubernetes.io/name': 'etcd-defragd' } },
    spec: { groups: rules.groups },
  };
  return (
    '# Generated from deploy/prometheus/etcd-defragd-rules.yaml by scripts/validate-manifests.ts --write:\n' +
    '# the same alert rules (unit-tested there with promtool) for the Prometheus Operator.\n' +
    stringify(doc, { lineWidth: 0 })
  );
}

const failures: string[] = [];
const fail = (m: string) => failures.push(m);

if (process.argv.includes('--write')) writeFileSync(ruleFile, prometheusRule());
if (readFileSync(ruleFile, 'utf8') !== prometheusRule())
  fail(`${ruleFile} differs from ${rulesFile}: run node --import tsx scripts/validate-manifests.ts --write`);

const docs: { file: string; doc: Obj }[] = [];
for (const name of readdirSync(dir)
  .filter((f) => f.endsWith('.yaml'))
  .sort()) {
  for (const d of parseAllDocuments(readFileSync(join(dir, name), 'utf8'))) {
    if (d.errors.length) fail(`${name}: ${d.errors[0]!.message}`);
    const doc = d.toJS() as Obj | null;
    if (doc) docs.push({ file: name, doc });
  }
}

for (const { file, doc } of docs) {
  const what = `${file}: ${doc.kind} ${doc.metadata?.name}`;
  const Model = MODELS[`${doc.apiVersion}/${doc.kind}`];
  if (!Model) {
    fail(`${what}: no schema for ${doc.apiVersion} ${doc.kind}`);
    continue;
  }
  try {
    new Model(doc as never).validate();
  } catch (err) {
    fail(`${what}: ${(err as Error).message}`);
    continue;
  }
  const pod: Obj | undefined = doc.kind === 'Pod' ? doc.spec : doc.kind === 'DaemonSet' ? doc.spec.template.spec : undefined;
  if (!pod) continue;
  // What the manifests promise (issue 16): host network, control-plane nodes, critical priority,
  // read-only mounts, and time for a running defragment to finish.
  if (pod.hostNetwork !== true) fail(`${what}: hostNetwork must be true (etcd listens on the node's 127.0.0.1)`);
  if (pod.priorityClassName !== 'system-node-critical') fail(`${what}: priorityClassName must be system-node-critical`);
  if (doc.kind === 'DaemonSet') {
    if (pod.nodeSelector?.['node-role.kubernetes.io/control-plane'] !== '') fail(`${what}: nodeSelector must pick control-plane nodes`);
    if (!pod.tolerations?.some((t: Obj) => t.key === 'node-role.kubernetes.io/control-plane'))
      fail(`${what}: must tolerate the control-plane taint`);
  }
  for (const c of pod.containers as Obj[]) {
    for (const m of c.volumeMounts ?? []) if (m.readOnly !== true) fail(`${what}: volumeMount ${m.name} must be readOnly`);
    if (c.securityContext?.readOnlyRootFilesystem !== true) fail(`${what}: readOnlyRootFilesystem must be true`);
    if (!c.securityContext?.capabilities?.drop?.includes('ALL')) fail(`${what}: capabilities must drop ALL`);
  }
  for (const v of pod.volumes ?? [])
    if (v.hostPath && !['Directory', 'File'].includes(v.hostPath.type)) fail(`${what}: hostPath ${v.name} needs a type`);
  // The defrag timeout the pod runs with: from the ConfigMap it mounts, else the default (10m).
  const cmName = (pod.volumes as Obj[] | undefined)?.find((v) => v.configMap)?.configMap.name as string | undefined;
  const cm = docs.find((d) => d.doc.kind === 'ConfigMap' && d.doc.metadata.name === cmName)?.doc;
  const cfg = cm ? (parse(cm.data['config.yaml']) as Obj) : {};
  const timeoutMs = parseDuration(cfg.etcd?.defragTimeout ?? '10m') ?? NaN;
  if (!(pod.terminationGracePeriodSeconds * 1000 > timeoutMs))
    fail(
      `${what}: terminationGracePeriodSeconds ${pod.terminationGracePeriodSeconds} must exceed etcd.defragTimeout (${timeoutMs / 1000} s)`,
    );
}

const kinds = docs.map((d) => d.doc.kind).sort();
for (const k of ['ConfigMap', 'DaemonSet', 'Pod', 'PodMonitor', 'PrometheusRule'])
  if (!kinds.includes(k)) fail(`deploy/kubernetes has no ${k}`);
if (failures.length) {
  for (const f of failures) process.stderr.write(`FAIL ${f}\n`);
  process.exit(1);
}
process.stdout.write(
  `deploy/kubernetes: ${docs.length} objects valid against the Kubernetes and Prometheus Operator schemas (${kinds.join(', ')})\n`,
);

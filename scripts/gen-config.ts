// Writes config/etcd-defragd.yaml from the schema in src/config.ts, so the shipped file always
// lists every key with its default. A unit test fails when the file is stale.
import { writeFileSync } from 'node:fs';
import { renderDefaultConfig } from '../src/config.ts';

const out = new URL('../config/etcd-defragd.yaml', import.meta.url);
writeFileSync(out, renderDefaultConfig());
console.log(`wrote ${out.pathname}`);

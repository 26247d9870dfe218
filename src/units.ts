// Durations and sizes as operators write them in the config file.

const DURATION_UNITS: Record<string, number> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 };
const SIZE_UNITS: Record<string, number> = {
  B: 1,
  KiB: 1024,
  MiB: 1024 ** 2,
  GiB: 1024 ** 3,
  TiB: 1024 ** 4,
  kB: 1000,
  KB: 1000,
  MB: 1000 ** 2,
  GB: 1000 ** 3,
  TB: 1000 ** 4,
};

export const DURATION_ACCEPTED = 'duration such as 500ms, 10s, 10m, 3h, 1d (a plain integer is milliseconds)';
export const SIZE_ACCEPTED = 'a size such as 64MiB, 2GiB, 500MB (units B, KiB, MiB, GiB, TiB, kB, MB, GB, TB; a plain integer is bytes)';

/** Parses `10s`, `1h30m`, `250` (ms). Returns undefined when the text is not a duration. */
export function parseDuration(value: unknown): number | undefined {
  if (typeof value === 'number') return Number.isSafeInteger(value) && value >= 0 ? value : undefined;
  if (typeof value !== 'string') return undefined;
  const text = value.trim();
  if (/^\d+$/.test(text)) return Number(text);
  const parts = text.match(/^(\d+(?:\.\d+)?(ms|s|m|h|d))+$/) ? text.matchAll(/(\d+(?:\.\d+)?)(ms|s|m|h|d)/g) : null;
  if (!parts) return undefined;
  let total = 0;
  for (const [, n, unit] of parts) total += Number(n) * DURATION_UNITS[unit!]!;
  return Number.isFinite(total) ? Math.round(total) : undefined;
}

/** Parses `64MiB`, `2 GiB`, `1048576`. Returns undefined when the text is not a size. */
export function parseSize(value: unknown): number | undefined {
  if (typeof value === 'number') return Number.isSafeInteger(value) && value >= 0 ? value : undefined;
  if (typeof value !== 'string') return undefined;
  const m = value.trim().match(/^(\d+(?:\.\d+)?)\s*([A-Za-z]*)$/);
  if (!m) return undefined;
  const factor = m[2] === '' ? 1 : SIZE_UNITS[m[2]!];
  if (factor === undefined) return undefined;
  const bytes = Number(m[1]) * factor;
  return Number.isSafeInteger(Math.round(bytes)) ? Math.round(bytes) : undefined;
}

export function formatBytes(bytes: number): string {
  const abs = Math.abs(bytes);
  if (abs < 1024) return `${bytes}B`;
  const units = ['KiB', 'MiB', 'GiB', 'TiB'];
  let v = bytes / 1024;
  let i = 0;
  while (Math.abs(v) >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${v.toFixed(v >= 100 ? 0 : v >= 10 ? 1 : 2)}${units[i]}`;
}

export function formatDuration(ms: number): string {
  if (ms < 1000) return `${Math.round(ms)}ms`;
  if (ms < 60_000) return `${(ms / 1000).toFixed(ms < 10_000 ? 2 : 1)}s`;
  if (ms < 3_600_000) return `${Math.floor(ms / 60_000)}m${Math.round((ms % 60_000) / 1000)}s`;
  return `${Math.floor(ms / 3_600_000)}h${Math.round((ms % 3_600_000) / 60_000)}m`;
}

export function formatPercent(ratio: number): string {
  return `${(ratio * 100).toFixed(1)}%`;
}

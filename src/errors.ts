// Coded errors, exit codes and run outcomes. Every code is listed with what to do in README.md ("Errors").

export const EXIT = {
  ok: 0,
  failed: 1,
  usage: 64,
  skipped: 75,
  config: 78,
} as const;

/** How a run ends; `once` exits with its code (exitCodeFor in run.ts). */
export const OUTCOMES = ['done', 'not-needed', 'skipped', 'failed'] as const;
export type Outcome = (typeof OUTCOMES)[number];

export type ErrorCode =
  | 'EDD_CONFIG' // a config value, file or flag is wrong
  | 'EDD_USAGE' // bad command line
  | 'EDD_TLS' // certificate or CA problem talking to etcd
  | 'EDD_AUTH' // etcd refused our credentials or permissions
  | 'EDD_UNAVAILABLE' // etcd did not answer (transient)
  | 'EDD_ETCD' // etcd answered with an error we do not classify
  | 'EDD_INTEGRITY' // members disagree on HashKV after a defrag
  | 'EDD_DEFRAG'; // a defragment failed

export class DefragdError extends Error {
  readonly code: ErrorCode;
  readonly permanent: boolean;

  constructor(code: ErrorCode, message: string, opts: { cause?: unknown; permanent?: boolean } = {}) {
    super(message, { cause: opts.cause });
    this.name = 'DefragdError';
    this.code = code;
    this.permanent = opts.permanent ?? code !== 'EDD_UNAVAILABLE';
  }
}

/** A configuration mistake: names the key, the value, what is accepted and where it came from. */
export class ConfigError extends DefragdError {
  constructor(message: string, opts: { cause?: unknown } = {}) {
    super('EDD_CONFIG', message, { ...opts, permanent: true });
    this.name = 'ConfigError';
  }
}

export class UsageError extends DefragdError {
  constructor(message: string) {
    super('EDD_USAGE', message, { permanent: true });
    this.name = 'UsageError';
  }
}

export function errorMessage(err: unknown): string {
  if (err instanceof Error) return err.message;
  return String(err);
}

/** How the harness prints an error it caught (tests and the benchmark sort failures by this text). */

/** Formats an error as "Class: message" (etcd3 errors lose `.code`; the class is the signal). */
export function errorText(err: unknown): string {
  if (err instanceof Error) return `${err.constructor.name}: ${err.message}`;
  return String(err);
}

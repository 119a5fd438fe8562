/** Query parameters that carry credentials: Swift temp URLs, S3 presigned URLs, tokens. */
const SECRET_PARAMS = /^(temp_url_sig|signature|x-amz-signature|x-amz-credential|x-amz-security-token|token|auth_token|access_token|sig|key)$/i;

/** A URL safe to log: userinfo and credential-bearing query parameters replaced. */
export function redactUrl(raw: string): string {
  let url: URL;
  try {
    url = new URL(raw);
  } catch {
    return '<unparseable url>';
  }
  if (url.username || url.password) {
    url.username = 'REDACTED';
    url.password = '';
  }
  for (const key of [...url.searchParams.keys()]) {
    if (SECRET_PARAMS.test(key)) url.searchParams.set(key, 'REDACTED');
  }
  return url.toString();
}

/** Header names whose values never reach a log. */
export const SECRET_HEADERS = /^(authorization|x-auth-token|x-storage-token|cookie|proxy-authorization|x-subject-token)$/i;

export function redactHeaders(headers: Record<string, string>): Record<string, string> {
  const out: Record<string, string> = {};
  for (const [k, v] of Object.entries(headers)) out[k] = SECRET_HEADERS.test(k) ? 'REDACTED' : v;
  return out;
}

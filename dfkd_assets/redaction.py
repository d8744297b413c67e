"""Keeping secrets out of what the pipeline records.

One rule: anything the pipeline writes where people or other systems read it (logs, Dagster
metadata, MLflow params and artifacts, DVC params, the model card, printed summaries, error
messages, the failure log and webhook) goes through `redact` first. `redact` masks every
credential shape it knows, in any text, with `***`, and keeps what is not secret (scheme, user,
host, path, parameter names) so an error still says which server failed:

- userinfo of a URL, `scheme://user:PASSWORD@host`, whatever the password holds (`/`, `?`, `#`,
  `@`, `:`, quotes): it runs to the last `@` of the URL. A URL whose user part alone is a token
  (`https://TOKEN@github.com`, 16 characters or more) loses the user part;
- the same without a scheme, `user:PASSWORD@host[:port][/db]` (a DSN written bare);
- credentials in a query string or fragment (`?password=`, `&token=`, `access_token=`,
  `X-Amz-Signature=`, `X-Amz-Credential=`, `X-Amz-Security-Token=`, `X-Goog-Signature=`, Azure
  SAS `sig=`, `api_key=`, `key=`, `client_secret=`, ...);
- `key=value` pairs of ODBC / ADO / JDBC / libpq connection strings and of free text
  (`PWD=...;`, `Password={...};`, `password='...'`), and `"password": "..."` in JSON/YAML/reprs;
- `Authorization: Basic/Bearer ...` headers and `Bearer <token>`;
- tokens with a recognisable shape wherever they appear: GitHub, GitLab, Slack (and the Slack and
  Discord webhook paths), OpenAI/Stripe-style `sk-`/`sk_live_`, Google API keys, AWS access key
  ids, JWTs, PEM private keys.

Credentials of an MLflow *server* URL are handed to MLflow through its own environment variables
instead of the URL (`split_credentials`, `use_tracking_credentials`), so MLflow's error messages,
which quote the URL, never contain them; those variables hold the credentials of one server at a
time and are removed when the process turns to another server or is done with it.
Standard library only: config.py imports it.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from typing import Iterator
from urllib.parse import unquote

MASK = "***"
PASSWORD_MAX = 512  # the longest password (userinfo) recognised

# ------------------------------------------------------------------------------- what is a secret key

# words (of a key split at '_', '-', '.' and camelCase) that make its value a credential: `db_password`,
# `MLFLOW_TRACKING_TOKEN`, `clientSecret`, `X-Amz-Signature`, `PWD`; not `max_tokens` or `tokenizer`
_SECRET_PARTS = {"password", "passwd", "pwd", "pw", "pswd", "pass", "passphrase", "secret", "token", "signature", "credential", "credentials",
                 "apikey", "accesskey", "secretkey", "accountkey", "sessionid", "jwt", "authorization", "sharedaccesssignature",
                 "awsaccesskeyid"}
# two adjacent words that do: `api_key`, `X-Api-Key`, `AccountKey`, `private_key`, `session_id`
_SECRET_PAIRS = {("api", "key"), ("access", "key"), ("secret", "key"), ("private", "key"), ("account", "key"), ("master", "key"),
                 ("session", "id"), ("auth", "token"), ("access", "token"), ("refresh", "token"), ("code", "verifier")}
# secrets only as URL query parameters (`?key=` is Google's API key, `sig=` Azure's SAS signature, `auth=`):
# in free text these are ordinary words
_QUERY_ONLY_KEYS = {"key", "sig", "auth", "code", "session"}
# a key ending in one of these describes a credential without holding it: `token_type`, `password_file`,
# `webhook_url_env`, `token_expires_in`, `max_tokens`
_DESCRIPTIVE_LAST = {"type", "count", "len", "length", "url", "uri", "endpoint", "expires", "expiry", "expiration", "ttl", "file",
                     "path", "env", "name", "hint", "policy", "reset", "required", "prompt", "limit", "size", "algorithm", "method",
                     "in", "at", "header", "headers", "version", "format", "scope", "kind", "mode", "dir"}


def _words(key: str) -> list[str]:
    return [w.lower() for w in re.findall(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|\d+", key)]


def is_secret_key(key: str, in_query: bool = False) -> bool:
    """True for a parameter name whose value is a credential (`password`, `X-Amz-Signature`, `db_pwd`, `clientSecret`)."""
    words = _words(key)
    if not words:
        return False
    if "".join(words) in _QUERY_ONLY_KEYS or (len(words) == 1 and words[0] in _QUERY_ONLY_KEYS):
        return in_query
    joined = "".join(words)
    if len(words) > 1 and words[-1] in _DESCRIPTIVE_LAST:
        return False
    return (joined in _SECRET_PARTS or any(w in _SECRET_PARTS for w in words)
            or any((a, b) in _SECRET_PAIRS or a + b in _SECRET_PARTS for a, b in zip(words, words[1:])))


# ----------------------------------------------------------------------------------------- patterns

# scheme://user:password@host...: `user` runs to the first ':', the password to the LAST '@' of the
# URL (the `after` part holds no '@'), so '/', '?', '#', '@', ':' in a password are masked too. A
# password is at most PASSWORD_MAX characters: the bound keeps the scan linear in the text's length
_URL_USERINFO = re.compile(
    rf"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^\s:/?#]*):(?P<password>\S{{0,{PASSWORD_MAX}}})@(?P<after>[^\s@]*)")
# scheme://TOKEN@host (no password; a user part this long is a token, not a user name)
_URL_TOKEN_USER = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^\s:/?#@]{16,})@(?=[\w\[])")
# user:password@host without a scheme (not inside a URL: no '/', ':' or '@' right before the user; a
# password does not start with '/', so `models:/name@alias` and `runs:/id@x` are URIs, not credentials)
_BARE_USERINFO = re.compile(rf"(?<![\w.+\-/:@%~])(?P<user>[A-Za-z0-9._%+\-~]+):(?!/)(?P<password>\S{{0,{PASSWORD_MAX}}})@(?P<after>[\w\[][^\s@]*)")
# ?key=value / &key=value / #key=value (query strings and fragments, signed URLs)
_QUERY_PARAM = re.compile(r"(?P<pre>[?&#])(?P<key>[A-Za-z0-9_.\-\[\]]+)=(?P<value>[^&#\s\"'<>]*)")
# key=value in connection strings and free text: {braced;value}, "quoted", 'quoted', or up to ';', a line
# end, or the next `key=` (libpq's space-separated form)
_KV = re.compile(
    r"(?P<pre>(?:^|[;\s,({\[|\"']))(?P<key>[A-Za-z_][A-Za-z0-9_.\-]*)\s*=\s*"
    r"(?P<value>\{(?:[^}]|\}\})*\}|\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*'|[^;\r\n]*?(?=;|$|[\r\n]|[\s,]+[A-Za-z_][A-Za-z0-9_.\-]*\s*=))",
    re.M)
# "key": "value" / 'key': 'value' / key: value (JSON, reprs, YAML, headers)
_COLON = re.compile(
    r"(?P<pre>(?:^|[\s{,(\[]))(?P<q>[\"']?)(?P<key>[A-Za-z_][A-Za-z0-9_.\-]*)(?P=q)\s*:[ \t]*"
    r"(?P<value>\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*'|(?:(?:Basic|Bearer|Token|Digest|Negotiate|AWS4-HMAC-SHA256)[ \t]+)?[^\s,}\]\"']+)", re.M)
_BEARER = re.compile(r"\b(?P<scheme>Bearer)[ \t]+(?=[A-Za-z0-9\-._~+/]*\d)[A-Za-z0-9\-._~+/]{8,}=*")
_SHAPES = [  # (pattern, replacement): tokens recognisable wherever they appear
    (re.compile(r"-----BEGIN (?P<kind>[A-Z0-9 ]*)PRIVATE KEY-----.*?(?:-----END (?P=kind)PRIVATE KEY-----|\Z)", re.S),
     lambda m: f"-----BEGIN {m['kind']}PRIVATE KEY-----{MASK}-----END {m['kind']}PRIVATE KEY-----"),
    (re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{20,255}|github_pat_[A-Za-z0-9_]{20,255})\b"), MASK),
    (re.compile(r"\bglpat-[A-Za-z0-9_\-]{20,}"), MASK),
    (re.compile(r"\bxox[abposre]-[A-Za-z0-9\-]{10,}"), MASK),
    (re.compile(r"\b(?:sk|rk)[-_](?:live_|test_|proj-|ant-(?:api\d+-)?)?[A-Za-z0-9_\-]{20,}"), MASK),
    (re.compile(r"\bAIza[0-9A-Za-z\-_]{35}\b"), MASK),
    (re.compile(r"\b(?:AKIA|ASIA|ABIA|ACCA)[0-9A-Z]{16}\b"), MASK),
    (re.compile(r"\beyJ[A-Za-z0-9_\-]{5,}\.eyJ[A-Za-z0-9_\-]{5,}\.[A-Za-z0-9_\-]{10,}"), MASK),
    (re.compile(r"(?P<keep>hooks\.slack\.com/(?:services|workflows|triggers)/)[A-Za-z0-9/_\-]+"), lambda m: m["keep"] + MASK),
    (re.compile(r"(?P<keep>discord(?:app)?\.com/api/webhooks/\d+/)[A-Za-z0-9_\-]+"), lambda m: m["keep"] + MASK),
]


def _mask_value(value: str) -> str:
    if value[:1] in "{\"'" and len(value) >= 2:
        return value[0] + MASK + value[-1]
    return MASK


def _query(m: re.Match) -> str:
    if m["value"] in ("", MASK) or not is_secret_key(m["key"], in_query=True):
        return m[0]
    return f"{m['pre']}{m['key']}={MASK}"


def _kv(m: re.Match) -> str:
    if not m["value"].strip() or m["value"] == MASK or not is_secret_key(m["key"]):
        return m[0]
    return m[0][: m.start("value") - m.start()] + _mask_value(m["value"])


def _colon(m: re.Match) -> str:
    value = m["value"]
    if value in (MASK, '""', "''") or not is_secret_key(m["key"]):
        return m[0]
    scheme = re.match(r"(?:Basic|Bearer|Token|Digest|Negotiate|AWS4-HMAC-SHA256)[ \t]+", value)
    kept = m[0][: m.start("value") - m.start()] + (scheme[0] if scheme else "")
    return kept + _mask_value(value[scheme.end():] if scheme else value)


def redact(text: str) -> str:
    """`text` with every credential it holds (see the module docstring) replaced by ***."""
    if not isinstance(text, str):
        text = str(text)
    for pattern, repl in _SHAPES:
        text = pattern.sub(repl, text)
    text = _URL_USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@{m['after']}", text)
    text = _URL_TOKEN_USER.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    text = _BARE_USERINFO.sub(lambda m: f"{m['user']}:{MASK}@{m['after']}", text)
    text = _QUERY_PARAM.sub(_query, text)
    text = _KV.sub(_kv, text)
    text = _COLON.sub(_colon, text)
    return _BEARER.sub(lambda m: f"{m['scheme']} {MASK}", text)


def redact_exception(e: BaseException) -> BaseException:
    """A stand-in for `e` and its causes whose messages went through `redact` (same type name in the
    text, same tracebacks): what may be chained to an error that Dagster records, since Dagster
    stores every cause's message too."""
    seen: dict[int, BaseException] = {}

    def copy(x: BaseException | None) -> BaseException | None:
        if x is None:
            return None
        if id(x) in seen:
            return seen[id(x)]
        clean = RedactedError(f"{type(x).__module__}.{type(x).__qualname__}: {redact(str(x))}")
        seen[id(x)] = clean
        clean.__traceback__ = x.__traceback__
        clean.__cause__ = copy(x.__cause__)
        clean.__context__ = copy(x.__context__)
        clean.__suppress_context__ = x.__suppress_context__
        return clean

    return copy(e)


class RedactedError(Exception):
    """An error whose original message held a credential: the message here is masked."""


# ------------------------------------------------------------------------------- MLflow server credentials


def split_credentials(uri: str) -> tuple[str, str | None, str | None]:
    """An http(s) URL -> (URL without user:password@, user, password); other URIs unchanged.

    Only http(s): MLflow reads a server's basic-auth credentials from MLFLOW_TRACKING_USERNAME /
    MLFLOW_TRACKING_PASSWORD, while a database URI needs its password inside the URI. The password
    runs to the last '@' (an unescaped '/', '?', '#' or '@' in it stays in it).
    """
    m = _URL_USERINFO.match(uri)
    if m is None or m["scheme"].lower() not in ("http://", "https://"):
        return uri, None, None
    return m["scheme"] + uri[m.start("after"):], unquote(m["user"]), unquote(m["password"])


USERNAME_VAR, PASSWORD_VAR = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"
_held: dict = {}  # what this process put into MLflow's variables: uri, user, password, and the values they replaced


def use_tracking_credentials(uri: str) -> str:
    """Point MLflow's credential variables at `uri`'s server and return `uri` without them.

    MLflow reads MLFLOW_TRACKING_USERNAME/PASSWORD for *every* server it talks to, so credentials
    handed over for server A would also go to server B. Here they are held for one server at a
    time: a URI with `user:password@` replaces whatever this process set before; a URI of another
    server without them removes what this process set (restoring what the variables held before:
    credentials the user exported are theirs). `release_tracking_credentials` removes them when done.
    """
    bare, user, password = split_credentials(uri)
    if user is not None:
        if not _held:
            _held["prior"] = (os.environ.get(USERNAME_VAR), os.environ.get(PASSWORD_VAR))
        _held.update(uri=bare, user=user, password=password or "")
        os.environ[USERNAME_VAR], os.environ[PASSWORD_VAR] = user, password or ""
    elif _held and _held["uri"] != bare:
        release_tracking_credentials()
    return bare


def release_tracking_credentials() -> None:
    """Remove the credentials `use_tracking_credentials` put into the environment (where they are still
    there), putting back what the variables held before."""
    if not _held:
        return
    for var, ours, prior in ((USERNAME_VAR, _held["user"], _held["prior"][0]), (PASSWORD_VAR, _held["password"], _held["prior"][1])):
        if os.environ.get(var) == ours:
            if prior is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = prior
    _held.clear()


def held_credentials_uri() -> str | None:
    """The server whose credentials this process holds in MLflow's variables (None: none)."""
    return _held.get("uri")


@contextmanager
def tracking_credentials(uri: str) -> Iterator[str]:
    """`use_tracking_credentials` for the block only; yields the URI without credentials."""
    bare = use_tracking_credentials(uri)
    try:
        yield bare
    finally:
        release_tracking_credentials()

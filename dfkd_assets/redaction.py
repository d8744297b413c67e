"""Keeping secrets out of what the pipeline records.

Store and remote URLs may carry a password (`postgresql+psycopg2://mlflow:PASSWORD@db/mlflow`,
`https://user:TOKEN@host/dvc`). Anything the pipeline writes where people or other systems read
it (logs, Dagster metadata, MLflow params and artifacts, DVC params, printed summaries, error
messages) goes through `redact` first. Credentials of an MLflow *server* URL are handed to MLflow
through its own environment variables instead of the URL (`split_credentials`), so MLflow's error
messages, which quote the URL, never contain them. Standard library only: config.py imports it.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

# scheme://user:password@  (the password runs to the last '@' before the path, so an unescaped '@' or ':' in it is masked too)
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^\s:/@]*):(?P<password>[^\s/]+)@")
MASK = "***"


def redact(text: str) -> str:
    """`text` with the password of every `scheme://user:password@host` URL replaced by ***."""
    return _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)


def split_credentials(uri: str) -> tuple[str, str | None, str | None]:
    """An http(s) URL -> (URL without user:password@, user, password); other URIs unchanged.

    Only http(s): MLflow reads a server's basic-auth credentials from MLFLOW_TRACKING_USERNAME /
    MLFLOW_TRACKING_PASSWORD, while a database URI needs its password inside the URI.
    """
    m = _USERINFO.match(uri)
    if m is None or m["scheme"].lower() not in ("http://", "https://"):
        return uri, None, None
    return m["scheme"] + uri[m.end():], unquote(m["user"]), unquote(m["password"])

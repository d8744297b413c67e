"""The failure record and its webhook (the `record_failures` sensor, defs/automation.py).

The webhook URL comes from the environment (`operations.webhook_url_env`) and usually holds a
token (in its path, `hooks.slack.com/services/T/B/<token>`, or its query, `?token=`), so it
never appears in anything this module returns: a URL that is not http(s) (`hooks.example.com/...`
without a scheme: urllib's own error quotes the whole URL) is refused naming the variable only,
and delivery errors name their kind. The record's error text goes through `redact` before it is
cut to length (a cut could split a secret so that it is no longer recognised).
Standard library only.
"""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request
from datetime import datetime, timezone
from urllib.parse import urlsplit

from dfkd_assets.redaction import redact

ERROR_MAX_CHARS = 2000


class WebhookError(ValueError):
    """The webhook URL cannot be used; the message never holds the URL."""


def failure_record(run_id: str, job: str, message: str | None, at: datetime | None = None) -> dict:
    """One line of storage/run_failures.jsonl, as POSTed to the webhook: the error text masked."""
    return {"run_id": run_id, "job": job, "error": redact(message or "")[:ERROR_MAX_CHARS],
            "at": (at or datetime.now(timezone.utc)).isoformat(timespec="seconds")}


def webhook_request(url: str, payload: dict, env_name: str) -> urllib.request.Request:
    """A POST of `payload` as JSON to `url`; WebhookError (naming `$env_name`, not the URL) unless it is an http(s) URL with a host."""
    try:
        parts = urlsplit(url.strip())
        has_host = bool(parts.hostname)
    except ValueError:  # e.g. a malformed IPv6 host or port
        parts, has_host = None, False
    if parts is None or parts.scheme.lower() not in ("http", "https") or not has_host:
        raise WebhookError(f"${env_name} is not an http(s) URL with a host (it must start with http:// or https://); "
                           "the URL is not shown because it may hold a token: fix the variable")
    return urllib.request.Request(url.strip(), data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}, method="POST")


def post_webhook(url: str, payload: dict, env_name: str, timeout: float = 10) -> str | None:
    """POST `payload` to the webhook; None when it answered 2xx, else a warning that names `$env_name`
    and what went wrong, never the URL or its token."""
    try:
        req = webhook_request(url, payload, env_name)
    except WebhookError as e:
        return f"failure webhook not called: {e}"
    try:
        urllib.request.urlopen(req, timeout=timeout).close()
    except urllib.error.HTTPError as e:
        return f"failure webhook (${env_name}) answered HTTP {e.code}"
    except (OSError, ValueError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", None)
        detail = type(reason).__name__ if isinstance(reason, BaseException) else type(e).__name__
        return f"failure webhook (${env_name}) did not answer: {detail}"
    return None

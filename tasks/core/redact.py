"""Credentials never leave the process: the one redaction every sftflow writer applies (logs, Prefect artifacts,
summary.json, failure.md, the run's config.yaml copy, MLflow params and tags, model cards, train/mlflow_run.json).

A URI's user info (`http://user:TOKEN@host`, `https://TOKEN@host`) becomes `***`, and the value of a query parameter
that names a secret (`?token=`, `access_token`, `api_key`, `password`, `sig`, `X-Amz-Signature`, ...) becomes `***`.
Redaction works on any text, so a URI inside a log line or an error message is caught too. The URI sftflow
*connects* with is never changed: only what it writes. A redacted URI read back from a file (a rerun's config copy,
train/mlflow_run.json) is turned into the real one by `reveal`, from MLFLOW_TRACKING_URI or a URI this process was
given, never from a file.

Prefer MLflow's own credential variables (MLFLOW_TRACKING_TOKEN, MLFLOW_TRACKING_USERNAME/PASSWORD) over a URI with
user info: they never appear in a URI at all.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

MASK = "***"
SECRET_PARAMS = ("token", "access_token", "id_token", "refresh_token", "auth", "authorization", "api_key", "apikey",
                 "api-key", "key", "password", "passwd", "pwd", "secret", "client_secret", "sig", "signature",
                 "x-amz-signature", "x-amz-credential", "x-amz-security-token", "session_token", "sas", "code")
# scheme://userinfo@ : userinfo runs up to the first @ with no /, whitespace, ? or # before it (RFC 3986)
USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/\s@?#\"'<>]+)@")
QUERY_SECRET = re.compile(r"(?P<key>[?&;](?:" + "|".join(re.escape(p) for p in SECRET_PARAMS) + r")=)"
                          r"(?P<value>[^&#\s\"'<>)\]]*)", re.IGNORECASE)
REMEMBERED: dict[str, str] = {}  # redacted -> real, for URIs this process was handed (never written anywhere)


def redact(text: str) -> str:
    """Return `text` with every URI's user info and every secret query value replaced by `***`."""
    if "://" not in text and "=" not in text:
        return text
    text = USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    return QUERY_SECRET.sub(lambda m: f"{m['key']}{MASK}" if m["value"] else m[0], text)


def has_secret(text: str) -> bool:
    """Return True when `text` holds something `redact` would hide."""
    return redact(text) != text


def redact_value(value: Any) -> Any:
    """Return `value` (str, list, tuple, dict, or anything else left as it is) with every string in it redacted,
    keys included."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {redact_value(k): redact_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_value(v) for v in value)
    return value


def public_url(uri: str) -> str:
    """Return a URL fit for a link a person clicks: user info and secret query parameters dropped altogether (the
    browser asks for credentials itself), not masked."""
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    parts = urlsplit(uri)
    if not parts.scheme or not parts.netloc:
        return redact(uri)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k.lower() not in SECRET_PARAMS]
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return redact(urlunsplit((parts.scheme, netloc, parts.path, urlencode(query), parts.fragment)))


def remember(uri: str) -> str:
    """Note a URI this process connects with, so its redacted form read back later can be revealed; return it."""
    if has_secret(uri):
        REMEMBERED[redact(uri)] = uri
    return uri


def reveal(uri: str | None) -> str | None:
    """Return the real URI behind a redacted one: a URI this process was handed, else MLFLOW_TRACKING_URI when it
    redacts to the same; `uri` itself when it holds nothing redacted; None when the secret is not to be had here."""
    if uri is None or MASK not in uri:
        return uri
    for candidate in (REMEMBERED.get(uri), os.environ.get("MLFLOW_TRACKING_URI")):
        if candidate and redact(candidate) == uri:
            return candidate
    return None


@contextmanager
def redacted_errors() -> Iterator[None]:
    """Re-raise an MLflow error whose message quotes a URI with credentials (MLflow's "API request to <URI> failed")
    with that message redacted, as the same kind of error (MlflowException, its error code kept): Prefect stores a
    failed task's message in its database, and retries decide by the exception's type, not its text."""
    try:
        yield
    except Exception as e:
        errors = sys.modules.get("mlflow.exceptions")  # not imported: it cannot be an MLflow error
        if errors is not None and isinstance(e, errors.MlflowException) and has_secret(str(e)):
            raise errors.MlflowException(redact(str(e)), error_code=e.error_code) from None
        raise


class RedactingFilter(logging.Filter):
    """Redact a log record's message (arguments merged in) before any handler sees it: the console, Prefect's API
    handler (the run's logs in its database) or a file."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a malformed record: leave it to logging's own error report
            return True
        if has_secret(message):
            record.msg, record.args = redact(message), None
        return True


LOGGERS = ("sftflow", "prefect", "prefect.flow_runs", "prefect.task_runs", "mlflow", "tasks", "flows")


def install_log_redaction() -> None:
    """Put a RedactingFilter on the loggers sftflow's stages, Prefect's run loggers and MLflow write through, and on
    their handlers and the root's (a logger's own filter does not see its children's records; a handler's does).
    Once each: filters on loggers survive Prefect's logging setup. MLflow's own "View run at <URL>" lines, written to
    stdout rather than logged, are switched off unless asked for: sftflow writes its own (redacted) links."""
    for logger in (logging.getLogger(name) for name in LOGGERS):
        for target in (logger, *logger.handlers):
            if not any(isinstance(f, RedactingFilter) for f in target.filters):
                target.addFilter(RedactingFilter())
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

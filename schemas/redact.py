"""URLs as they may be shown: the one place that decides what of a URL is a secret (docs/security.md, "Security: rows
are untrusted").

    redact("https://u:pw@host/a.png?X-Amz-Date=20240101T000000Z&X-Amz-Signature=f00d")
    # -> "https://***@host/a.png?X-Amz-Date=20240101T000000Z&X-Amz-Signature=***"

``redact`` works on any text, a bare URL or a message holding URLs, and is applied wherever a URL can be
shown: every row error's message (``schemas.rows.RowError``), every job error's line (``jobs.run``), the
driver's log lines (``RedactingFilter``), the run summary and the manifest. It replaces with ``***``:
- user info (``scheme://user:password@host``);
- the value of a query or fragment parameter whose name reads as a credential, case-insensitively:
  a word of the name (split at ``-``, ``_``, ``.`` and camelCase) is one of ``SECRET_WORDS`` (``sig``
  of Azure SAS, ``key``, ``auth``...), or the name contains one of ``SECRET_PARTS`` (``signature``,
  ``credential``, ``token``, ``secret``, ``passw``...): ``X-Amz-Signature``, ``X-Amz-Credential``,
  ``X-Amz-Security-Token``, ``X-Goog-Signature``, ``X-Goog-Credential``, ``sig``, ``access_token``,
  ``api_key``, ``AWSAccessKeyId``, ``password``...;
- the value of any other parameter longer than ``MAX_SHOWN_VALUE`` characters, or percent-encoding a
  secret of its own (a URL inside a URL): signing schemes vary (imgix's ``s``, Akamai's ``hdnts``,
  Tencent's ``q-ak``), so a long opaque value is taken for a secret.
Short values of other parameters stay readable (``X-Amz-Date``, ``X-Amz-Expires``, SAS ``se``/``sp``/``sv``).
Paths are shown as they are: a secret in a path segment cannot be told from a file name.
"""

from __future__ import annotations

import logging
import re
from urllib.parse import unquote

SECRET_WORDS = frozenset({"sig", "key", "auth", "authorization", "pass", "pwd", "jwt", "hmac", "accesskey"})
SECRET_PARTS = ("signature", "credential", "token", "secret", "passw", "passphrase", "apikey", "privatekey")
MAX_SHOWN_VALUE = 24  # characters of an unknown parameter's (decoded) value shown as they are
HIDDEN = "***"

# Each pattern starts only where its first character can (a scheme's first letter not after another
# scheme character, or a '?', '&' or '#'), so a long row path is scanned once, never quadratically.
_USER_INFO = re.compile(r"(?i)(?<![a-z0-9+.\-])([a-z][a-z0-9+.\-]*://)[^\s/?#'\"]*@")
_PARAM = re.compile(r"([?&#])([^\s=&#?'\"]+)=([^\s&#?'\"]*)")
_WORDS = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+")


def is_secret_param(name: str, value: str = "") -> bool:
    """Whether a query parameter's value is hidden (see the module docstring)."""
    name = unquote(name)
    if any(part in name.lower() for part in SECRET_PARTS):
        return True
    if any(word.lower() in SECRET_WORDS for word in _WORDS.findall(name)):
        return True
    decoded = unquote(value)
    return len(decoded) > MAX_SHOWN_VALUE or (decoded != value and redact(decoded) != decoded)


def _param(match: re.Match) -> str:
    sep, name, value = match.groups()
    return f"{sep}{name}={HIDDEN}" if value and is_secret_param(name, value) else match.group(0)


def redact(text: str) -> str:
    """``text`` with the secrets of every URL in it replaced by ``***`` (see the module docstring)."""
    if "@" in text:
        text = _USER_INFO.sub(rf"\1{HIDDEN}@", text)
    if "=" in text:
        text = _PARAM.sub(_param, text)
    return text


class RedactingFilter(logging.Filter):
    """Redacts each record's message and traceback before a handler writes it (``install_log_filter``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        record.msg, record.args = redact(message), None
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def install_log_filter(logger: logging.Logger | None = None) -> None:
    """Put ``RedactingFilter`` on each handler of ``logger`` (the root logger: every log line this process
    writes through it), once."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())

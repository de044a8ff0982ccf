"""Redact credentials from anything quantkit writes down: logs, recipe copies, errors.

A recipe's token key is refused outright, but secrets also ride in other values: an
endpoint URL with `user:password@`, a token pasted into a commit message, `token=` in a
query string. Everything that leaves the process as text (run.log, the run folder's
recipe copy, quantkit.json's command line, the one-line error) goes through `redact`.
"""

from __future__ import annotations

import logging
import os
import re

MASK = "***"
TOKEN_ENV_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "MODELSCOPE_API_TOKEN")

_PATTERNS = (
    # scheme://user:password@host -> scheme://***@host
    (re.compile(r"(?P<keep>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@]+@"), rf"\g<keep>{MASK}@"),
    # key=value / key: value for secret-looking keys (query strings, pasted configs)
    (re.compile(r"(?P<keep>\b(?:[A-Za-z_]*(?:token|password|passwd|secret)|api[_-]?key|"
                r"access[_-]?key)\s*[=:]\s*)[^\s&,;'\"]+", re.I), rf"\g<keep>{MASK}"),
    # Hugging Face and ModelScope tokens, GitHub tokens
    (re.compile(r"\bhf_[A-Za-z0-9]{16,}"), f"hf_{MASK}"),
    (re.compile(r"\bms-[0-9a-fA-F-]{16,}"), f"ms-{MASK}"),
    (re.compile(r"\bgh[pousr]_[A-Za-z0-9]{16,}"), MASK),
    # long random-looking words: mixed case and digits (hex hashes are all lower case)
    (re.compile(r"\b(?=\w*[A-Z])(?=\w*[a-z])(?=\w*\d)[A-Za-z0-9]{32,}\b"), MASK),
)


def redact(text: str) -> str:
    """`text` with every credential quantkit can recognize replaced by ***."""
    for name in TOKEN_ENV_VARS:
        value = os.environ.get(name)
        if value and len(value) >= 8:
            text = text.replace(value, MASK)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class RedactFilter(logging.Filter):
    """Attach to a handler: every message it emits has its credentials replaced by ***."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact(record.getMessage()), ()
        return True


def redact_obj(obj):
    """A copy of a YAML/JSON structure with every string redacted."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {key: redact_obj(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [redact_obj(value) for value in obj]
    return obj

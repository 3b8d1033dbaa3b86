"""Upload size limits shared by the app and its front proxy, so both refuse the same bodies."""

from __future__ import annotations

MIB = 1024 * 1024
# The body also carries the multipart framing: a file of exactly MAX_UPLOAD_MB still goes through.
MULTIPART_SLACK = 64 * 1024


def body_limit(upload_mb: float) -> int:
    """Return the largest request body, in bytes, accepted for an upload cap of ``upload_mb`` MB."""
    return int(upload_mb * MIB) + MULTIPART_SLACK

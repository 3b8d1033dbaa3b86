"""Pages sent in two parts: the answer at once, the slow rest (photo, heatmap) as it is made.

A result page needs Grad-CAM (tens of milliseconds on a CPU, more under load) only for its heatmap,
which the person may never ask to see. The template marks where the answer ends with ``ANSWER_END``;
everything up to it leaves in one piece before the template goes on to what it computes later (it calls
the ``late`` function the view passes), so the browser shows the verdict while the heatmap is made.
The marker stays in the page: the upload page's script swaps the answer in when it has read that far.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from flask import Response, stream_template
from markupsafe import Markup

# An HTML comment, so it is harmless where it stays; the script looks for the same text (static/app.js).
ANSWER_END = Markup("<!--aisight:answer-end-->")


def _two_parts(pieces: Iterator[str]) -> Iterator[str]:
    """Join the template's many small pieces into two writes: up to and including ANSWER_END, then the rest."""
    buf: list[str] = []
    for piece in pieces:
        if ANSWER_END in piece:
            head, tail = piece.split(ANSWER_END, 1)
            buf.append(head + ANSWER_END)
            yield "".join(buf)
            buf = [tail]
        else:
            buf.append(piece)
    yield "".join(buf)


def stream_page(template: str, **context: Any) -> Response:
    """Render ``template`` as a streamed response that sends the answer before the rest is rendered."""
    resp = Response(_two_parts(stream_template(template, answer_end=ANSWER_END, **context)), mimetype="text/html")
    # The front proxy (nginx) would otherwise hold the first part until the whole page is in its buffer.
    resp.headers["X-Accel-Buffering"] = "no"
    return resp

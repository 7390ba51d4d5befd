"""What the staff console needs over plain HTTP: its page and its canned replies.

The console itself is static (``static/staff.html`` and its modules); it speaks the
same WebSocket protocol as every other staff client. Canned replies are the knowledge
base's answers (``data/hotel.toml``), served as JSON at ``/staff/canned.json``.

They are served without a token, on purpose: each answer is exactly what the concierge
tells any guest who asks about that topic, so the list discloses nothing a guest
cannot already read, and the server keeps a single way of checking staff tokens (the
WebSocket ``hello``) instead of growing a second one over HTTP. The corollary, said in
``docs/staff-console.md``: a knowledge base must never hold anything staff-only.
"""

from __future__ import annotations

from typing import Any

from ._concierge import KnowledgeBase
from ._http import Response, json_response, static_response, text_response

__all__ = ["canned_replies", "canned_response", "sign_in_link", "staff_page"]


def staff_page() -> Response:
    """The staff console (``GET /staff``)."""
    return static_response("staff.html") or text_response(404, "not found\n")


def canned_replies(kb: KnowledgeBase) -> list[dict[str, Any]]:
    """Every topic's answer, in the knowledge base's order, small talk left out (a
    greeting is quicker typed than found)."""
    return [
        {"id": topic.id, "title": topic.title, "text": topic.answer}
        for topic in kb.topics
        if not topic.smalltalk
    ]


def canned_response(kb: KnowledgeBase) -> Response:
    """``GET /staff/canned.json``: ``{"hotel": name, "replies": [{id, title, text}]}``."""
    response = json_response({"hotel": kb.hotel_name, "replies": canned_replies(kb)})
    return Response(
        response.status, response.body, response.content_type, (("Cache-Control", "no-cache"),)
    )


DEFAULT_PUBLIC_URL = "http://127.0.0.1:8765"


def sign_in_link(public_url: str, token: str) -> str:
    """The link that opens the staff console signed in: ``{url}/staff#token=...``.

    The token rides in the fragment, which browsers never send to the server and
    proxies never log; the page reads it, keeps it, and drops it from the address bar.
    ``public_url`` is the server's address as staff reach it (``https://chat.hotel``);
    raises ``ValueError`` unless it is an http(s) URL.
    """
    url = public_url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")) or "#" in url or "?" in url:
        raise ValueError(f"--url must be the server's http(s) address, not {public_url!r}")
    return f"{url}/staff#token={token}"

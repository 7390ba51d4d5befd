"""The server shell: it carries out what the session core decides.

``_server`` (accept, sessions, heartbeats, graceful shutdown, concierge tasks),
``_connection`` (one connection's outbox and writer), ``_http`` (the one-port HTTP
front), ``_wire`` (WebSocket handshake and frames), ``_store`` (SQLite, the embedded
default, and the Trio store around any backend), ``_store_memory`` (the in-memory
backend of the mock server), ``_concierge`` (the rules concierge), ``_admin`` (staff and
guest tokens for the command line) and ``static/`` (the guest page). The public names
are re-exported by :mod:`trio_chat`.
"""

"""The Trio client: :class:`~trio_chat.ChatClient` for guests and
:class:`~trio_chat.StaffClient` for staff, reconnecting with jitter, an offline outbox
and exact resume. Its bookkeeping (outbox, transcript) is pure and lives in
:mod:`trio_chat.core.client_state`; the public names are re-exported by :mod:`trio_chat`.
"""

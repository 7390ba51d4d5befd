"""A storage backend in memory: the same writes, reads and guarantees as the SQLite
one (``seq`` without gaps, idempotent ``client_msg_id``, batches applied whole), kept
in dictionaries. For the mock server, tests and experiments: nothing survives the
process.
"""

from __future__ import annotations

import copy
import os
import threading
import time
from dataclasses import replace
from typing import Any

from ..core.errors import StorageError
from ..core.protocol import Message, format_ts
from ..core.storage import (
    Appended,
    AppendMessage,
    ConversationRow,
    Operation,
    Revocation,
    SetRead,
    StaffMember,
    StaffSignIn,
    TouchGuest,
)
from ..core.tokens import new_id

__all__ = ["MemoryBackend"]

PREVIEW_CHARS = 120


class MemoryBackend:
    """:class:`~trio_chat.core.storage.StorageBackend` in memory. Thread-safe (the
    Trio store calls it from its writer and reader threads).

    ``fail_writes`` makes every batch fail with :class:`StorageError` (nothing of it
    stored) until cleared: a storage failure on demand.
    """

    def __init__(self, secret: bytes | None = None) -> None:
        self._secret = secret if secret is not None else os.urandom(32)
        self._lock = threading.RLock()
        self._guest_names: dict[str, str | None] = {}
        self._staff: dict[str, StaffMember] = {}
        self._rows: dict[str, ConversationRow] = {}  # by conversation id
        self._of_guest: dict[str, str] = {}  # guest id -> conversation id
        self._messages: dict[str, list[Message]] = {}
        self._by_key: dict[tuple[str, str | None, str], Message] = {}
        self._guest_read: dict[str, int] = {}
        # reply once: (conversation, guest message seq) -> the concierge's reply to it
        self._replies: dict[tuple[str, int], Message] = {}
        self._revocations: list[Revocation] = []
        self._guest_created: dict[str, float] = {}  # guest id -> POSIX time
        self.fail_writes = False

    # -- writes ------------------------------------------------------------------------

    def apply_batch(self, operations: list[Operation[Any]]) -> list[Any]:
        with self._lock:
            if self.fail_writes:
                raise StorageError("the memory store was told to fail")
            saved = self._snapshot()
            try:
                return [op.apply(self) for op in operations]
            except BaseException:
                self._restore(saved)
                raise

    def _snapshot(self) -> tuple[Any, ...]:
        return (
            dict(self._guest_names),
            copy.deepcopy(self._rows),
            dict(self._of_guest),
            {cid: list(messages) for cid, messages in self._messages.items()},
            dict(self._by_key),
            dict(self._guest_read),
            dict(self._replies),
        )

    def _restore(self, saved: tuple[Any, ...]) -> None:
        (
            self._guest_names,
            self._rows,
            self._of_guest,
            self._messages,
            self._by_key,
            self._guest_read,
            self._replies,
        ) = saved

    def append(self, op: AppendMessage) -> Appended:
        row = self._rows.get(op.conversation_id)
        if row is None:
            raise StorageError(f"no conversation {op.conversation_id}")
        key = (op.conversation_id, op.author_key, op.client_msg_id or "")
        if op.client_msg_id is not None and key in self._by_key:
            return Appended(self._by_key[key], duplicate=True)
        if op.expect is not None and op.expect != (row.status, row.assigned_staff_id):
            return Appended(
                Message(0, op.conversation_id, op.sender, op.author, op.text, "", None),
                duplicate=False,
                conflict=(row.status, row.assigned_staff_id, row.assigned_name),
            )
        if op.reply_to is not None and (op.conversation_id, op.reply_to) in self._replies:
            return Appended(self._replies[op.conversation_id, op.reply_to], duplicate=True)
        now = time.time()
        message = Message(
            row.last_seq + 1,
            op.conversation_id,
            op.sender,
            op.author,
            op.text,
            format_ts(now),
            op.client_msg_id,
        )
        self._messages.setdefault(op.conversation_id, []).append(message)
        if op.client_msg_id is not None:
            self._by_key[key] = message
        if op.reply_to is not None:
            self._replies[op.conversation_id, op.reply_to] = message
        row.last_seq = message.seq
        row.updated_ts = now
        row.preview = op.text[:PREVIEW_CHARS]
        if op.status is not None:
            row.status, row.assigned_staff_id, row.assigned_name = op.status
        return Appended(message, duplicate=False, at=now)

    def set_read(self, op: SetRead) -> None:
        row = self._rows.get(op.conversation_id)
        if row is None:
            return
        if op.reader == "staff":
            row.read_seq = max(row.read_seq, op.seq)
        else:
            self._guest_read[op.conversation_id] = max(
                self._guest_read.get(op.conversation_id, 0), op.seq
            )
            row.guest_read_seq = self._guest_read[op.conversation_id]

    def create_guest(self, name: str | None, room: str | None = None) -> ConversationRow:
        guest_id = new_id("g")
        now = time.time()
        row = ConversationRow(
            new_id("c"), guest_id, name, "ai", None, None, 0, 0, now, "", now, room
        )
        self._guest_names[guest_id] = name
        self._guest_created[guest_id] = row.updated_ts
        self._rows[row.conversation_id] = row
        self._of_guest[guest_id] = row.conversation_id
        return replace(row)

    def touch_guest(self, op: TouchGuest) -> None:
        cid = self._of_guest.get(op.guest_id)
        if cid is not None:
            row = self._rows[cid]
            row.last_seen_ts = max(row.last_seen_ts, op.at)

    def expire_silent_guests(
        self,
        before: float,
        keep: frozenset[str],
        keep_conversations: frozenset[str] = frozenset(),
    ) -> list[str]:
        expired = []
        for conversation_id, row in list(self._rows.items()):
            silent = not any(m.sender == "guest" for m in self._messages.get(conversation_id, ()))
            created = self._guest_created.get(row.guest_id, 0.0)
            if (
                created < before
                and silent
                and row.status in ("ai", "resolved")
                and row.guest_id not in keep
                and conversation_id not in keep_conversations
            ):
                del self._rows[conversation_id], self._of_guest[row.guest_id]
                del self._guest_names[row.guest_id]
                self._messages.pop(conversation_id, None)
                self._guest_read.pop(conversation_id, None)
                self._by_key = {k: m for k, m in self._by_key.items() if k[0] != conversation_id}
                expired.append(row.guest_id)
        return expired

    # -- administration ------------------------------------------------------------------

    def add_staff(self, name: str) -> StaffMember:
        with self._lock:
            name = name.strip()
            if not name or any(m.name == name for m in self._staff.values()):
                raise ValueError(f"a staff member named {name!r} already exists or is empty")
            member = StaffMember(new_id("s"), name)
            self._staff[member.staff_id] = member
            return member

    def list_staff(self) -> list[StaffMember]:
        with self._lock:
            return sorted(self._staff.values(), key=lambda m: m.name)

    def remove_staff(self, name_or_id: str) -> bool:
        with self._lock:
            member = self._find_staff(name_or_id)
            if member is None:
                return False
            del self._staff[member.staff_id]
            self._record("removed", member.staff_id)
            return True

    def _find_staff(self, name_or_id: str) -> StaffMember | None:
        for member in self._staff.values():
            if name_or_id in (member.name, member.staff_id):
                return member
        return None

    def _record(self, kind: str, staff_id: str | None = None, generation: int = 0) -> None:
        seq = self._revocations[-1].seq + 1 if self._revocations else 1
        self._revocations.append(Revocation(seq, kind, staff_id, generation))

    def revoke_staff(self, name_or_id: str) -> StaffMember | None:
        """Raise the staff member's token generation (their older tokens stop working);
        the member with the new generation, or ``None`` if unknown."""
        with self._lock:
            member = self._find_staff(name_or_id)
            if member is None:
                return None
            member = replace(member, generation=member.generation + 1)
            self._staff[member.staff_id] = member
            self._record("revoked", member.staff_id, member.generation)
            return member

    def rotate_secret(self) -> None:
        """A new token secret: every token signed before stops verifying."""
        with self._lock:
            self._secret = os.urandom(32)
            self._record("secret")

    def add_guest(self, name: str | None, room: str | None = None) -> ConversationRow:
        with self._lock:
            return self.create_guest(name, room)

    # -- reads -------------------------------------------------------------------------

    def secret(self) -> bytes:
        return self._secret

    def conversation_of_guest(self, guest_id: str) -> ConversationRow | None:
        with self._lock:
            cid = self._of_guest.get(guest_id)
            return replace(self._rows[cid]) if cid is not None else None

    def conversation(self, conversation_id: str) -> ConversationRow | None:
        with self._lock:
            row = self._rows.get(conversation_id)
            return replace(row) if row is not None else None

    def staff_member(self, staff_id: str) -> StaffMember | None:
        with self._lock:
            return self._staff.get(staff_id)

    def staff_sign_in(self, staff_id: str) -> StaffSignIn:
        with self._lock:
            member = self._staff.get(staff_id)
            if member is None:
                return StaffSignIn(None, [], [])
            held = self.held_conversations(staff_id)
            return StaffSignIn(member, self.queue(time.time()), held)

    def queue(self, now: float, limit: int = 500) -> list[ConversationRow]:
        with self._lock:
            rows = [
                replace(r)
                for r in self._rows.values()
                if r.status in ("waiting", "staff")
                or (r.status == "ai" and r.last_seq > 0 and r.updated_ts > now - 86400)
                or (r.status == "resolved" and r.updated_ts > now - 86400)
            ]
            rows.sort(key=lambda r: r.updated_ts, reverse=True)
            return rows[:limit]

    def history(self, conversation_id: str, after_seq: int, limit: int) -> list[Message]:
        with self._lock:
            messages = self._messages.get(conversation_id, [])
            return messages[after_seq : after_seq + limit]

    def recent(self, conversation_id: str, count: int) -> list[Message]:
        with self._lock:
            return self._messages.get(conversation_id, [])[-count:] if count > 0 else []

    def message_by_client_id(
        self, conversation_id: str, author_key: str, client_msg_id: str
    ) -> Message | None:
        with self._lock:
            return self._by_key.get((conversation_id, author_key, client_msg_id))

    def held_conversations(self, staff_id: str) -> list[ConversationRow]:
        with self._lock:
            return [
                replace(r)
                for r in self._rows.values()
                if r.status == "staff" and r.assigned_staff_id == staff_id
            ]

    def revocations_since(self, after_seq: int) -> list[Revocation]:
        with self._lock:
            return [r for r in self._revocations if r.seq > after_seq]

    def unanswered(self, since: float) -> list[tuple[ConversationRow, Message]]:
        with self._lock:
            owed = []
            for row in self._rows.values():
                messages = self._messages.get(row.conversation_id)
                if (
                    row.status == "ai"
                    and messages
                    and messages[-1].sender == "guest"
                    and row.updated_ts > since
                ):
                    owed.append((replace(row), messages[-1]))
            return owed

    def checkpoint(self) -> None:
        """Nothing to copy anywhere (the SQLite store checkpoints its WAL here)."""

    def close(self) -> None:
        """Nothing to release."""

"""Compressed contexts on disk: ``<store>/<id>.rcc`` memory files (the
:class:`~rcc.CompressedContext` format, written atomically), the pending
document ``<store>/<id>.txt`` while it is being compressed, and a SQLite index
``<store>/index.sqlite3`` of ids, status and progress.

A context is served only once its row says ``ready``, which is written after
its memory file is in place; the file itself is checksummed. A server killed
during compression leaves the row ``queued``/``compressing`` and the document
on disk: :meth:`Store.recover` queues it again (or marks it failed after
:data:`MAX_ATTEMPTS` crashed attempts, so a document that kills the server
cannot do so forever).

One server at a time: the store is locked (``flock`` on ``<store>/serve.lock``) for as
long as a :class:`Store` is open, and a second one is refused with one line. Servers
sharing a store would each keep their own memory cache and job queue, so a context
deleted through one would still be answered by the other, and a document posted to
both compressed twice. The kernel drops the lock when its process dies, so a server
killed with -9 does not leave the store locked.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import sqlite3
import threading
import time
from pathlib import Path

from rcc.errors import RCCError
from rcc.files import atomic_write_text

STATUSES = ("queued", "compressing", "ready", "failed")
MAX_ATTEMPTS = 2
FIELDS = ("id", "name", "status", "tokens", "slots", "windows_done", "windows_total", "bytes", "error",
          "attempts", "model_id", "created", "updated", "parent")


def context_id(text: str, model_id: str) -> str:
    """The id of a document: sha256 of the model's fingerprint and the text, so
    the same document posted twice is one entry (and another model's memory of
    it is another)."""
    return hashlib.sha256(f"{model_id}\n{text}".encode()).hexdigest()[:32]


class Store:
    """The on-disk index of compressed contexts (thread-safe)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise RCCError(f"--store {self.root}: cannot create it ({err.strerror or err}); give a writable folder") \
                from None
        self._owner = _lock_store(self.root)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.root / "index.sqlite3"), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS contexts (id TEXT PRIMARY KEY, name TEXT, status TEXT NOT NULL, "
            "tokens INTEGER, slots INTEGER, windows_done INTEGER DEFAULT 0, windows_total INTEGER, bytes INTEGER, "
            "error TEXT, attempts INTEGER DEFAULT 0, model_id TEXT, created REAL, updated REAL, parent TEXT)"
        )
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(contexts)")}
        if "parent" not in columns:  # a store written before appends existed
            self._db.execute("ALTER TABLE contexts ADD COLUMN parent TEXT")

    def memory_path(self, cid: str) -> Path:
        return self.root / f"{cid}.rcc"

    def text_path(self, cid: str) -> Path:
        return self.root / f"{cid}.txt"

    # ------------------------------------------------------------- rows
    def get(self, cid: str) -> dict | None:
        with self._lock:
            row = self._db.execute(f"SELECT {', '.join(FIELDS)} FROM contexts WHERE id = ?", (cid,)).fetchone()
        return dict(zip(FIELDS, row)) if row else None

    def list(self) -> list[dict]:
        with self._lock:
            rows = self._db.execute(f"SELECT {', '.join(FIELDS)} FROM contexts ORDER BY created").fetchall()
        return [dict(zip(FIELDS, r)) for r in rows]

    def update(self, cid: str, **values) -> None:
        values["updated"] = time.time()
        cols = ", ".join(f"{k} = ?" for k in values)
        with self._lock:
            self._db.execute(f"UPDATE contexts SET {cols} WHERE id = ?", (*values.values(), cid))

    def add(self, cid: str, text: str, name: str | None, tokens: int, windows: int, model_id: str,
            parent: str | None = None) -> None:
        """Record a new document as ``queued``; its text is written first (atomically),
        so a queued row always has its document to compress. With ``parent`` the text
        is appended to that context (``tokens`` counts both, ``windows`` the new ones)."""
        atomic_write_text(self.text_path(cid), text)
        now = time.time()
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO contexts (id, name, status, tokens, slots, windows_done, windows_total, bytes, "
                "error, attempts, model_id, created, updated, parent) "
                "VALUES (?, ?, 'queued', ?, NULL, 0, ?, NULL, NULL, 0, ?, ?, ?, ?)",
                (cid, name, tokens, windows, model_id, now, now, parent),
            )

    def delete(self, cid: str) -> None:
        """Forget a context. A ready child never needs its parent (its memory file holds
        the parent's slots too); an append still waiting keeps the parent's memory file
        until it is done (:meth:`collect`)."""
        with self._lock:
            self._db.execute("DELETE FROM contexts WHERE id = ?", (cid,))
        self.text_path(cid).unlink(missing_ok=True)
        self.collect()

    def collect(self) -> list[str]:
        """Garbage collection: remove memory files without a row, except those a
        queued or compressing append reads (its parent's); returns the ids removed."""
        with self._lock:
            rows = {r[0] for r in self._db.execute("SELECT id FROM contexts")}
            needed = {r[0] for r in self._db.execute(
                "SELECT parent FROM contexts WHERE parent IS NOT NULL AND status IN ('queued', 'compressing')")}
        gone = []
        for path in self.root.glob("*.rcc"):
            if path.stem not in rows and path.stem not in needed:
                path.unlink(missing_ok=True)
                gone.append(path.stem)
        return gone

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT status, COUNT(*) FROM contexts GROUP BY status").fetchall()
        return {s: 0 for s in STATUSES} | dict(rows)

    # --------------------------------------------------------- recovery
    def recover(self, model_id: str) -> list[str]:
        """After a restart: temp files of interrupted writes are removed; rows left
        ``queued``/``compressing`` are queued again (their ids are returned, oldest
        first) or marked failed after :data:`MAX_ATTEMPTS`; ``ready`` rows whose
        memory file is gone are marked failed."""
        for part in self.root.glob(".*.part"):
            part.unlink(missing_ok=True)
        again = []
        for row in self.list():
            cid = row["id"]
            if row["status"] in ("queued", "compressing"):
                if row["model_id"] != model_id:
                    self.update(cid, status="failed", error="queued by another model; POST the document again")
                elif not self.text_path(cid).is_file():
                    self.update(cid, status="failed", error="the document was lost in a restart; POST it again")
                elif row["parent"] and not self.memory_path(row["parent"]).is_file():
                    self.update(cid, status="failed", error=f"the context it appends to ({row['parent']}) is gone; "
                                                            "POST the whole text, or append to another context")
                elif row["attempts"] >= MAX_ATTEMPTS:
                    self.update(cid, status="failed",
                                error=f"the server stopped during {row['attempts']} attempts to compress this "
                                      "document; check its size against the server's memory, then POST it again")
                else:
                    self.update(cid, status="queued", windows_done=0)
                    again.append(cid)
            elif row["status"] == "ready" and not self.memory_path(cid).is_file():
                self.update(cid, status="failed", error="the memory file is missing; POST the document again")
        self.collect()
        return again

    def close(self) -> None:
        with self._lock:
            self._db.close()
        if self._owner is not None:
            self._owner.close()  # releases the flock
            self._owner = None


def _lock_store(root: Path):
    """The open lock file of ``root``, locked for this process (its pid written in it).

    Raises:
        RCCError: when another process holds the lock.
    """
    path = root / "serve.lock"
    fh = open(path, "a+", encoding="utf-8")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.seek(0)
        pid = fh.read().strip() or "?"
        fh.close()
        raise RCCError(f"the store {root} is in use by another rcc serve (pid {pid}); stop that server, or give "
                       "this one its own --store") from None
    fh.seek(0)
    fh.truncate()
    fh.write(str(os.getpid()))
    fh.flush()
    return fh

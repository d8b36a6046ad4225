"""The results store: one SQLite file per experiment folder holding runs, tidy metric rows and checkpoints.

``EXPERIMENT_DIR/results.sqlite`` has three tables:

- ``runs``: one row per (benchmark, method, config, seed) with its status (``running``, ``finished`` or
  ``failed``), the error traceback of a failed run, the resolved config as JSON, the code version and progress;
- ``metrics``: tidy rows ``(run_id, step, task, layer, metric, value)``;
- ``checkpoints``: the latest ``state_dict()`` of each unfinished run, serialised with ``torch.save``.

The rows of a chunk and the checkpoint taken right after it are written in ONE transaction
(:meth:`ResultStore.commit_chunk`), so after a crash the store holds exactly the rows produced up to the saved
state: resuming from it neither repeats nor loses a row.

The database runs in WAL mode with a busy timeout and a retry loop around every write, so several processes
(parallel seeds, sweep workers) can write into the same file at once. SQLite stores NaN as NULL; the
DataFrames returned here show it as NaN again.

Failing safely: before anything is written, an existing file is checked (SQLite header, size against the
header's page count, lopkit's tables and columns); a damaged file, a 0-byte file or another program's database
raises :class:`StoreError` with one line and is left byte-identical. ``ResultStore(path, read_only=True)`` never
creates or changes a file: a store no process has open is read ``immutable=1`` (guarded: reopened if a writer
starts), one being written with SQLite's ``mode=ro`` through the writer's ``-wal``/``-shm`` files
(:meth:`ResultStore._connect_read_only`), so read-only storage can be reported on; writing into a read-only store
raises :class:`StoreError`.

Every run records the process id and host that last started it; :meth:`ResultStore.runs` shows a ``running``
run whose process is gone from this host as ``interrupted`` (killed, or stopped with Ctrl-C).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import functools
import hashlib
import io
import json
import os
import random
import socket
import sqlite3
import subprocess
import time
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence, TypeVar

if TYPE_CHECKING:  # torch and pandas are imported only when needed (keeps the store light to import)
    import pandas as pd

from lopkit.configs import ConfigError, run_identity

__all__ = [
    "RUN_STATUSES",
    "STORE_FILENAME",
    "ResultStore",
    "RunRecord",
    "StoreError",
    "canonical_config_json",
    "code_version",
    "deserialize_state",
    "last_error_line",
    "load_kept_state",
    "make_run_id",
    "resolve_store_file",
    "serialize_state",
    "store_path",
]

STORE_FILENAME = "results.sqlite"
RUN_STATUSES = ("running", "finished", "failed")
SHOWN_STATUSES = RUN_STATUSES + ("interrupted",)
"""Statuses :meth:`ResultStore.runs` shows: the stored ones plus ``interrupted`` (``running``, process gone)."""
BUSY_TIMEOUT_SECONDS = 30.0
_STORE_SUFFIXES = (".sqlite", ".sqlite3", ".db")
_RUN_COLUMNS = (
    "run_id", "benchmark", "preset", "method", "seed", "config_json", "code_version", "status", "error",
    "created_at", "updated_at", "step", "total_steps",
)
_OWNER_COLUMNS = ("pid", "host")  # added later: an older store gets them when next opened for writing
_TABLES = ("runs", "metrics", "checkpoints")
_SQLITE_MAGIC = b"SQLite format 3\x00"
# primary SQLite result codes (the low byte of sqlite3.Error.sqlite_errorcode)
_SQLITE_READONLY, _SQLITE_CORRUPT, _SQLITE_CANTOPEN, _SQLITE_NOTADB = 8, 11, 14, 26
_METRIC_COLUMNS = ("run_id", "benchmark", "preset", "method", "seed", "step", "task", "layer", "metric", "value")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    benchmark TEXT NOT NULL,
    preset TEXT,
    method TEXT NOT NULL,
    seed INTEGER NOT NULL,
    config_json TEXT NOT NULL,
    code_version TEXT,
    status TEXT NOT NULL CHECK (status IN ('running', 'finished', 'failed')),
    error TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    step INTEGER NOT NULL DEFAULT 0,
    total_steps INTEGER,
    pid INTEGER,
    host TEXT
);
CREATE TABLE IF NOT EXISTS metrics (
    run_id TEXT NOT NULL,
    step INTEGER NOT NULL,
    task INTEGER NOT NULL,
    layer TEXT NOT NULL,
    metric TEXT NOT NULL,
    value REAL
);
CREATE INDEX IF NOT EXISTS metrics_by_run ON metrics (run_id, metric, step);
CREATE TABLE IF NOT EXISTS checkpoints (
    run_id TEXT PRIMARY KEY,
    step INTEGER NOT NULL,
    state BLOB NOT NULL,
    saved_at TEXT NOT NULL
);
"""

T = TypeVar("T")


def store_path(experiment_dir: str | Path) -> Path:
    """The results file of an experiment folder: ``EXPERIMENT_DIR/results.sqlite``."""
    return Path(experiment_dir) / STORE_FILENAME


def resolve_store_file(path: str | Path) -> Path:
    """A path ending in .sqlite/.sqlite3/.db is the file itself; anything else is an experiment folder."""
    path = Path(path)
    return path if path.suffix.lower() in _STORE_SUFFIXES else store_path(path)


def load_kept_state(path: str | Path, run_id: str) -> Any:
    """:meth:`ResultStore.kept_state` of the store at ``path`` (ConfigError if there is no store there)."""
    if not resolve_store_file(path).exists():
        raise ConfigError(f"{str(path)!r} holds no results.sqlite; run the stage it continues first "
                          f"(e.g. 'lopkit moe pretrain --out DIR')")
    with ResultStore(path) as store:
        return store.kept_state(run_id)


def _host() -> str:
    """This machine's host name (recorded with the pid of the process that runs a run)."""
    return socket.gethostname()


def _writable(path: Path) -> bool:
    """Whether this process may write ``path`` (and create its -wal/-shm files next to it)."""
    folder_ok = os.access(path.parent, os.W_OK | os.X_OK)
    return folder_ok and (not path.exists() or os.access(path, os.W_OK))


def _now() -> str:
    """UTC time as ISO 8601 text (what the ``*_at`` columns hold)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def canonical_config_json(config: Any) -> str:
    """The config as compact JSON with sorted keys, so equal configs always give the same text."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a dataclass instance or a mapping, got {type(config).__name__}")
    return json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)


def last_error_line(error: object) -> str:
    """The last non-empty line of a stored error (for a traceback: the exception and its message), or ""."""
    lines = [line.strip() for line in str(error or "").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def make_run_id(benchmark: str, method: str, config: Any, seed: int) -> str:
    """Stable id of one run: a hash of (benchmark, method, canonical config JSON, seed).

    A typed config is hashed through :func:`lopkit.configs.run_identity` (fields added later are left out while at
    their default, so older stores keep their ids); a mapping is hashed as given.
    """
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = run_identity(config)
    identity = json.dumps(
        {"benchmark": str(benchmark), "method": str(method), "config": json.loads(canonical_config_json(config)),
         "seed": int(seed)},
        sort_keys=True, separators=(",", ":"),
    )
    return hashlib.sha256(identity.encode("utf-8")).hexdigest()[:16]


def run_id_candidates(benchmark: str, method: str, config: Any, seed: int) -> list[str]:
    """Every id a store may hold this run under, the current one (:func:`make_run_id`) first.

    Fields added later (``run_id_neutral``) are left out of the current id at their default, but a store written
    while such a field was hashed holds it in the id: the other candidates add back each subset of those fields.
    """
    current = make_run_id(benchmark, method, config, seed)
    if not (dataclasses.is_dataclass(config) and not isinstance(config, type)):
        return [current]
    full = json.loads(canonical_config_json(config))
    identity = run_identity(config)
    dropped = sorted(set(full) - set(identity))
    ids = [current]
    for mask in range(1, 2 ** len(dropped)):
        back = {name: full[name] for bit, name in enumerate(dropped) if mask >> bit & 1}
        ids.append(make_run_id(benchmark, method, {**identity, **back}, seed))
    return ids


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """``lopkit.__version__`` plus the git commit of the source tree (with ``-dirty``) when it is a git checkout."""
    import lopkit

    version = str(getattr(lopkit, "__version__", "unknown"))
    source_dir = Path(lopkit.__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(source_dir), "rev-parse", "--short=12", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(source_dir), "status", "--porcelain", "--untracked-files=no", "--", "."],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return version
    return f"{version}+g{commit}{'-dirty' if dirty else ''}" if commit else version


def serialize_state(state: Any) -> bytes:
    """A benchmark ``state_dict()`` as bytes (``torch.save`` into memory)."""
    import torch

    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def deserialize_state(data: bytes) -> Any:
    """Inverse of :func:`serialize_state`.

    ``weights_only=False`` because states hold numpy and python RNG states and plain python objects; this is
    safe only because the blob is our own checkpoint, written by :meth:`ResultStore.commit_chunk` into the
    experiment's own store. Do not open stores from untrusted sources (unpickling can run code).
    """
    import torch

    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)


def _is_busy(error: sqlite3.OperationalError) -> bool:
    """True for the transient 'database is locked/busy' errors worth retrying."""
    text = str(error).lower()
    return "locked" in text or "busy" in text


class StoreError(RuntimeError):
    """The results store cannot be used as asked (damaged, not a lopkit store, read-only); one line says why and how.

    A failure of I/O, not of the input: not a :class:`lopkit.configs.ConfigError` (commands report it as one line).
    """


def _where(path: Path) -> str:
    """``results.sqlite in DIR`` (how messages name a store file)."""
    return f"{path.name} in {path.parent}"


def damaged_store_error(path: Path, reason: str) -> StoreError:
    """The one-line error for a file that is not a lopkit store or is damaged (the file is left as it is)."""
    return StoreError(f"{_where(path)} is not a lopkit store or is damaged: {reason}; move it away and rerun")


def read_only_store_error(path: Path, reason: str) -> StoreError:
    """The one-line error for a write into a store on read-only storage."""
    return StoreError(
        f"{_where(path)} is read-only ({reason}); it can be read (lopkit report) but not written: "
        "fix the permissions or copy the folder somewhere writable and rerun there"
    )


def _error_code(error: sqlite3.Error) -> int | None:
    """The primary SQLite result code of an error (None if unknown)."""
    code = getattr(error, "sqlite_errorcode", None)
    return None if code is None else int(code) & 0xFF


def check_store_file(path: str | Path) -> None:
    """Raise StoreError unless ``path`` (an existing file) starts like an SQLite database and is not truncated.

    Reads the 100-byte header only; the file is never written. A 0-byte file counts as damaged.
    """
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise damaged_store_error(path, "the file is empty (0 bytes)")
    with open(path, "rb") as handle:
        header = handle.read(100)
    if len(header) < 100 or not header.startswith(_SQLITE_MAGIC):
        raise damaged_store_error(path, f"not an SQLite database ({size} bytes without the SQLite file header)")
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(header[28:32], "big")
    header_pages_valid = pages > 0 and header[24:28] == header[92:96]  # SQLite's own validity rule
    wal = path.with_name(path.name + "-wal")
    wal_holds_pages = wal.exists() and wal.stat().st_size > 0  # after a crash the main file may lag behind
    if header_pages_valid and size < pages * page_size and not wal_holds_pages:
        raise damaged_store_error(path, f"truncated: the file has {size} bytes, its header says {pages * page_size}")


def pid_alive(pid: int) -> bool:
    """True if a process with this id exists on this machine (a zombie counts as gone)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return handle.read().rsplit(b")", 1)[-1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """What :meth:`ResultStore.start_run` found: the run's id, its status and step before this call, and whether it is new."""

    run_id: str
    status: str
    step: int
    is_new: bool
    total_steps: int | None = None


class ResultStore:
    """One experiment's SQLite results file (WAL mode, safe for several writing processes)."""

    def __init__(
        self, path: str | Path, timeout: float = BUSY_TIMEOUT_SECONDS, retries: int = 20, *, read_only: bool = False
    ):
        """Open ``path`` (an experiment folder or a ``.sqlite`` file), creating the store if needed.

        An existing store on read-only storage (no write permission on the file or its folder) is opened
        read-only, as with ``read_only=True``: reading works, every write raises StoreError (one line).
        Raises StoreError if an existing file is damaged or not a lopkit store (it is left untouched), or if a
        new store cannot be created; FileNotFoundError if ``read_only`` and there is no store.
        """
        self.path = resolve_store_file(path)
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.read_only = bool(read_only)
        self.immutable = False
        self._snapshot: tuple[int, ...] | None = None  # see _connect_read_only
        self._read_only_reason = "opened read-only"
        self._has_owner_columns = True
        self._conn: sqlite3.Connection | None = None
        if self.path.exists():
            check_store_file(self.path)
        elif read_only:
            raise FileNotFoundError(f"no results store at {self.path}")
        if not read_only and self.path.exists() and not _writable(self.path):
            self.read_only = True  # read-only storage: reading works, writes raise the read-only StoreError
            self._read_only_reason = "no write permission on the file or its folder"
        if self.read_only:
            self._conn = self._connect_read_only()
            self._check_schema(creating=False)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not _writable(self.path):
            raise read_only_store_error(self.path, "no write permission on the folder, so no store can be created")
        if not self.path.exists():
            self._create()
        # isolation_level=None: autocommit; transactions are opened explicitly with BEGIN IMMEDIATE
        self._conn = sqlite3.connect(str(self.path), timeout=self.timeout, isolation_level=None)
        try:
            self._check_schema(creating=True)  # before the first write: a foreign or damaged file stays untouched
            self._retry(self._initialise)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------------------------------- plumbing

    @property
    def conn(self) -> sqlite3.Connection:
        """The open connection (raises once the store is closed)."""
        if self._conn is None:
            raise RuntimeError(f"the results store {self.path} is closed")
        return self._conn

    def _create(self) -> None:
        """Create the store file atomically: built under a temporary name, then linked into place.

        So no process ever sees a half-created (0-byte) store, which would rightly be taken for a damaged one;
        if another process created it first, its file is kept.
        """
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.{random.getrandbits(32):08x}.tmp")
        try:
            conn = sqlite3.connect(str(temporary), timeout=self.timeout, isolation_level=None)
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("BEGIN IMMEDIATE")
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute("COMMIT")
            finally:
                conn.close()
            try:
                os.link(temporary, self.path)
            except FileExistsError:
                pass
            except OSError:  # a file system without hard links
                if not self.path.exists():
                    os.replace(temporary, self.path)
        finally:
            for leftover in (temporary, *(temporary.with_name(temporary.name + x) for x in ("-wal", "-shm"))):
                with contextlib.suppress(FileNotFoundError):
                    leftover.unlink()

    def _files_state(self) -> tuple[int, ...]:
        """What tells whether another process touched the store: a ``-wal`` file, and the main file's inode, size, mtime."""
        st = os.stat(self.path)
        return (int(self.path.with_name(self.path.name + "-wal").exists()), st.st_ino, st.st_size, st.st_mtime_ns)

    def _connect_read_only(self, allow_snapshot: bool = True) -> sqlite3.Connection:
        """A connection that reads the store without creating or changing any file next to it.

        SQLite opens a WAL database read-only (``mode=ro``) only if its ``-wal`` and ``-shm`` files exist or can be
        created, or if it is opened ``immutable=1`` (https://www.sqlite.org/wal.html, "Read-Only Databases"); a
        ``mode=ro`` reader of a closed store therefore creates both files and leaves them behind. So:

        - no ``-wal`` file: no process has the store open (every open connection keeps it; the last one to close
          checkpoints every row into the main file and deletes it), so the main file holds every row. It is read
          ``immutable=1`` (creates nothing; works in a read-only folder) as a guarded snapshot: a writer that opens
          the store later creates the ``-wal`` file and checkpoints into the main file, and ``_retry`` compares
          :meth:`_files_state` before and after every read, reopening (now with ``mode=ro``, the writer having
          created the files) and reading again when it moved, so a report during a run never reads a stale or torn
          file;
        - a ``-wal`` file (a writer is running, or one was killed): ``mode=ro`` through the existing files, so rows
          not yet checkpointed are read; only where the ``-shm`` file is missing and cannot be created (read-only
          folder) is the file read ``immutable=1`` as it is, with a warning when the ``-wal`` holds rows.
        """
        uri = "file:" + urllib.parse.quote(str(self.path.resolve()))
        wal = self.path.with_name(self.path.name + "-wal")
        self.immutable, self._snapshot = False, None
        if allow_snapshot and not wal.exists():
            state = self._files_state()
            conn = sqlite3.connect(f"{uri}?mode=ro&immutable=1", uri=True, timeout=self.timeout, isolation_level=None)
            self.immutable, self._snapshot = True, state
            return conn
        conn = None
        if os.access(self.path.parent, os.W_OK) or self.path.with_name(self.path.name + "-shm").exists():
            conn = sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=self.timeout, isolation_level=None)
            try:
                conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            except sqlite3.OperationalError as err:
                conn.close()
                conn = None
                if _error_code(err) not in (_SQLITE_CANTOPEN, _SQLITE_READONLY, None):
                    raise self._translate(err) from None
            except sqlite3.DatabaseError as err:
                conn.close()
                raise self._translate(err) from None
        if conn is None:  # not even the -shm file can be created: read the file as it is
            self.immutable = True
            if wal.exists() and wal.stat().st_size > 0:
                import warnings

                warnings.warn(f"{_where(self.path)} is on read-only storage with a non-empty {wal.name}: rows "
                              "written since its last checkpoint are not shown", RuntimeWarning, stacklevel=3)
            conn = sqlite3.connect(f"{uri}?mode=ro&immutable=1", uri=True, timeout=self.timeout,
                                   isolation_level=None)
        conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
        return conn

    def _reopen_read_only(self, allow_snapshot: bool = True) -> None:
        """Replace the read-only connection by a fresh one (another process touched the store)."""
        self.close()
        self._conn = self._connect_read_only(allow_snapshot)

    def _check_schema(self, creating: bool) -> None:
        """StoreError unless the file holds lopkit's tables (an empty SQLite file is fine when ``creating``)."""
        try:
            rows = self._retry(lambda: self.conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'").fetchall())
            tables = {str(name) for (name,) in rows}
            if not tables and creating:
                return
            missing = [t for t in _TABLES if t not in tables]
            if missing:
                found = ", ".join(sorted(tables)) or "none"
                raise damaged_store_error(self.path, f"it has no {', '.join(missing)} table (tables: {found})")
            columns = {str(row[1]) for row in self._retry(
                lambda: self.conn.execute("PRAGMA table_info(runs)").fetchall())}
        except sqlite3.Error as err:
            raise self._translate(err) from None
        lacking = [c for c in _RUN_COLUMNS if c not in columns]
        if lacking:
            raise damaged_store_error(self.path, f"its runs table lacks the columns {', '.join(lacking)}")
        self._has_owner_columns = all(c in columns for c in _OWNER_COLUMNS)

    def _translate(self, error: sqlite3.Error) -> Exception:
        """A StoreError for a damaged file or a write into read-only storage; other errors unchanged."""
        code = _error_code(error)
        text = str(error)
        if code in (_SQLITE_CORRUPT, _SQLITE_NOTADB) or "malformed" in text or "not a database" in text:
            return damaged_store_error(self.path, text)
        if code == _SQLITE_READONLY or "readonly database" in text:
            return read_only_store_error(self.path, text)
        if self.read_only is False and code == _SQLITE_CANTOPEN and not _writable(self.path):
            return read_only_store_error(self.path, text)
        return error

    def _initialise(self) -> None:
        """Switch to WAL, set the busy timeout, create the tables if missing and add columns newer code needs."""
        conn = self.conn
        conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise sqlite3.OperationalError(f"could not switch {self.path} to WAL mode (got {mode!r})")
        conn.execute("PRAGMA synchronous = NORMAL")  # safe in WAL mode against process crashes
        conn.execute("PRAGMA foreign_keys = OFF")
        with self._transaction():
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            columns = {str(row[1]) for row in conn.execute("PRAGMA table_info(runs)").fetchall()}
            for column, kind in zip(_OWNER_COLUMNS, ("INTEGER", "TEXT")):
                if column not in columns:
                    conn.execute(f"ALTER TABLE runs ADD COLUMN {column} {kind}")
        self._has_owner_columns = True

    def _retry(self, action: Callable[[], T]) -> T:
        """Run ``action``, retrying with jittered back-off while another process holds the write lock.

        A damaged file or a write into read-only storage raises StoreError instead of sqlite3's error. On a
        guarded ``immutable=1`` snapshot (see :meth:`_connect_read_only`) the read is redone on a fresh connection
        whenever another process touched the store before or during it.
        """
        for _ in range(max(self.retries, 3)):
            if self._snapshot is None:
                break
            if self._files_state() != self._snapshot:
                self._reopen_read_only()
                continue
            try:
                result = self._retry_busy(action)
            except (sqlite3.Error, StoreError):
                if self._snapshot is not None and self._files_state() != self._snapshot:
                    continue  # a writer checkpointed into the file while it was read: read again
                raise
            if self._snapshot is None or self._files_state() == self._snapshot:
                return result
        if self._snapshot is not None:  # the store keeps changing: read through SQLite's locks (mode=ro)
            self._reopen_read_only(allow_snapshot=False)
        return self._retry_busy(action)

    def _retry_busy(self, action: Callable[[], T]) -> T:
        """:meth:`_retry` without the snapshot guard: the busy retry loop and the StoreError translation."""
        delay = 0.05
        for attempt in range(self.retries + 1):
            try:
                return action()
            except sqlite3.OperationalError as err:
                if not _is_busy(err) or attempt == self.retries:
                    translated = self._translate(err)
                    if translated is err:
                        raise
                    raise translated from None
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 2.0)
            except sqlite3.DatabaseError as err:
                translated = self._translate(err)
                if translated is err:
                    raise
                raise translated from None
        raise AssertionError("unreachable")

    class _Transaction:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on error) on a connection in autocommit mode."""

        def __init__(self, conn: sqlite3.Connection):
            self.conn = conn

        def __enter__(self) -> sqlite3.Connection:
            self.conn.execute("BEGIN IMMEDIATE")
            return self.conn

        def __exit__(self, exc_type, exc, tb) -> None:
            if exc_type is None:
                try:
                    self.conn.execute("COMMIT")
                except BaseException:
                    self._rollback()
                    raise
            else:
                self._rollback()

        def _rollback(self) -> None:
            # SQLite may already have rolled back by itself (e.g. on SQLITE_FULL); never mask the first error
            with contextlib.suppress(sqlite3.Error):
                self.conn.execute("ROLLBACK")

    def _transaction(self) -> "ResultStore._Transaction":
        """A write transaction taking the lock up front (so it never fails half-way on a lock upgrade)."""
        return ResultStore._Transaction(self.conn)

    def ensure_writable(self) -> None:
        """Raise the one-line read-only StoreError now if this store was opened read-only (before any work)."""
        if self.read_only:
            raise read_only_store_error(self.path, self._read_only_reason)

    def _write(self, body: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``body(conn)`` inside one write transaction, retried as a whole if the database is busy."""
        self.ensure_writable()

        def attempt() -> T:
            with self._transaction() as conn:
                return body(conn)

        return self._retry(attempt)

    def close(self) -> None:
        """Close the connection (idempotent)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> "ResultStore":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ResultStore({str(self.path)!r})"

    # ------------------------------------------------------------------------------------------------ runs

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """The rows of one read-only SQL query (for scripts; read through the same guards as every read here)."""
        return self._retry(lambda: self.conn.execute(sql, tuple(params)).fetchall())

    def get_run(self, run_id: str) -> dict[str, Any] | None:
        """The ``runs`` row of ``run_id`` as a dict, or None if the run is unknown."""
        row = self._retry(
            lambda: self.conn.execute(f"SELECT {', '.join(_RUN_COLUMNS)} FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        )
        return dict(zip(_RUN_COLUMNS, row)) if row else None

    def resolve_run_id(self, benchmark: str, method: str, config: Any, seed: int) -> str:
        """The id this store knows the run by: a finished stored candidate, else any stored one, else the current id.

        So a store written before a config field was added (or while it was hashed) is resumed, not rerun
        (:func:`run_id_candidates`).
        """
        candidates = run_id_candidates(benchmark, method, config, seed)
        if len(candidates) == 1:
            return candidates[0]
        marks = ", ".join("?" * len(candidates))
        found = dict(self._retry(lambda: self.conn.execute(
            f"SELECT run_id, status FROM runs WHERE run_id IN ({marks})", candidates).fetchall()))
        for wanted in ("finished", None):
            for run_id in candidates:
                if run_id in found and (wanted is None or found[run_id] == wanted):
                    return run_id
        return candidates[0]

    def start_run(
        self,
        benchmark: str,
        method: str,
        config: Any,
        seed: int,
        *,
        preset: str | None = None,
        total_steps: int | None = None,
        run_id: str | None = None,
    ) -> RunRecord:
        """Register a run (status ``running``) or find it; returns its id and the status/step it had before.

        An existing unfinished (``running`` or ``failed``) run is marked ``running`` again with its error
        cleared; its committed rows and checkpoint are kept. A ``finished`` run is left untouched.
        """
        config_json = canonical_config_json(config)
        run_id = run_id or make_run_id(benchmark, method, json.loads(config_json), seed)
        version = code_version()

        def body(conn: sqlite3.Connection) -> RunRecord:
            found = conn.execute("SELECT status, step, total_steps FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            now = _now()
            if found is None:
                conn.execute(
                    "INSERT INTO runs (run_id, benchmark, preset, method, seed, config_json, code_version, status, "
                    "error, created_at, updated_at, step, total_steps, pid, host) VALUES (?, ?, ?, ?, ?, ?, ?, "
                    "'running', NULL, ?, ?, 0, ?, ?, ?)",
                    (run_id, benchmark, preset, method, int(seed), config_json, version, now, now, total_steps,
                     os.getpid(), _host()),
                )
                return RunRecord(run_id, "running", 0, True, total_steps)
            status, step, stored_total = found
            if status != "finished":
                conn.execute(
                    "UPDATE runs SET status = 'running', error = NULL, updated_at = ?, code_version = ?, "
                    "total_steps = COALESCE(?, total_steps), preset = COALESCE(preset, ?), pid = ?, host = ? "
                    "WHERE run_id = ?",
                    (now, version, total_steps, preset, os.getpid(), _host(), run_id),
                )
            return RunRecord(run_id, status, int(step), False, stored_total if total_steps is None else total_steps)

        return self._write(body)

    def set_total_steps(self, run_id: str, total_steps: int) -> None:
        """Record the run's total number of steps (known once the benchmark is built)."""
        self._write(
            lambda conn: conn.execute(
                "UPDATE runs SET total_steps = ?, updated_at = ? WHERE run_id = ?", (int(total_steps), _now(), run_id)
            )
        )

    def commit_chunk(
        self, run_id: str, rows: Sequence[Mapping[str, Any]], state_bytes: bytes | None, step: int
    ) -> None:
        """Write a chunk's metric rows, the checkpoint taken after it and the run's step in ONE transaction.

        ``state_bytes`` None writes the rows and the step without touching the checkpoint (for writers that do
        not checkpoint). Raises ValueError if ``step`` is behind what the store already holds for the run (a
        second process running the same run), so rows are never written twice.
        """
        records = [
            (run_id, int(r["step"]), int(r["task"]), str(r["layer"]), str(r["metric"]), _as_real(r["value"]))
            for r in rows
        ]
        now = _now()

        def body(conn: sqlite3.Connection) -> None:
            found = conn.execute("SELECT step, status FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            if found is None:
                raise ValueError(f"unknown run {run_id!r}; call start_run first")
            stored_step, status = found
            if status == "finished":
                raise ValueError(f"run {run_id} is already finished; it takes no more rows")
            if int(step) < int(stored_step) or (int(step) == int(stored_step) and records):
                raise ValueError(
                    f"run {run_id}: chunk ending at step {step} is not after the stored step {stored_step}; "
                    "is another process running the same run?"
                )
            if records:
                conn.executemany(
                    "INSERT INTO metrics (run_id, step, task, layer, metric, value) VALUES (?, ?, ?, ?, ?, ?)", records
                )
            if state_bytes is not None:
                conn.execute(
                    "INSERT INTO checkpoints (run_id, step, state, saved_at) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT(run_id) DO UPDATE SET step = excluded.step, state = excluded.state, "
                    "saved_at = excluded.saved_at",
                    (run_id, int(step), sqlite3.Binary(state_bytes), now),
                )
            conn.execute("UPDATE runs SET step = ?, updated_at = ? WHERE run_id = ?", (int(step), now, run_id))

        self._write(body)

    def load_checkpoint_bytes(self, run_id: str) -> tuple[int, bytes] | None:
        """``(step, raw state bytes)`` of the run's checkpoint, or None."""
        row = self._retry(
            lambda: self.conn.execute("SELECT step, state FROM checkpoints WHERE run_id = ?", (run_id,)).fetchone()
        )
        return (int(row[0]), bytes(row[1])) if row else None

    def load_checkpoint(self, run_id: str) -> tuple[int, Any] | None:
        """``(step, state)`` of the run's checkpoint (deserialised, see :func:`deserialize_state`), or None."""
        found = self.load_checkpoint_bytes(run_id)
        return None if found is None else (found[0], deserialize_state(found[1]))

    def kept_state(self, run_id: str) -> Any:
        """The final state kept by a finished run (``keep_checkpoint=True``); ConfigError saying what is missing."""
        run = self.get_run(run_id)
        if run is None:
            raise ConfigError(f"run {run_id!r} is not in the store {self.path}; run the stage that makes it first")
        found = self.load_checkpoint(run_id) if run["status"] == "finished" else None
        if found is None:
            raise ConfigError(
                f"run {run_id} ({run['benchmark']} {run['method']}, status {run['status']}) has no kept final state in "
                f"{self.path}; finish it with keep_checkpoint=True (the moe pipeline and CLI do this)"
            )
        return found[1]

    def finish_run(self, run_id: str, keep_checkpoint: bool = False) -> None:
        """Mark the run finished; its checkpoint is deleted unless ``keep_checkpoint`` (it is no longer needed)."""

        def body(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE runs SET status = 'finished', error = NULL, updated_at = ? WHERE run_id = ?", (_now(), run_id)
            )
            if not keep_checkpoint:
                conn.execute("DELETE FROM checkpoints WHERE run_id = ?", (run_id,))

        self._write(body)

    def fail_run(self, run_id: str, traceback_text: str) -> None:
        """Mark the run failed with its traceback; committed rows and the checkpoint are kept for a resume."""
        self._write(
            lambda conn: conn.execute(
                "UPDATE runs SET status = 'failed', error = ?, updated_at = ? WHERE run_id = ?",
                (str(traceback_text), _now(), run_id),
            )
        )

    def delete_run(self, run_id: str) -> None:
        """Remove a run with its rows and checkpoint (to start it again from scratch)."""

        def body(conn: sqlite3.Connection) -> None:
            for table in ("metrics", "checkpoints", "runs"):
                conn.execute(f"DELETE FROM {table} WHERE run_id = ?", (run_id,))

        self._write(body)

    # ------------------------------------------------------------------------------------------- reading

    def runs(self) -> "pd.DataFrame":
        """Every run as a DataFrame (columns of the ``runs`` table), in creation order.

        ``status`` shows a ``running`` run whose process (``pid`` on ``host``) is gone from this machine as
        ``interrupted`` (killed, crashed or stopped with Ctrl-C; rerun to resume it); ``stored_status`` keeps the
        stored value. A run owned by another host stays ``running`` (its process cannot be checked from here).
        """
        import pandas as pd

        owner = ", ".join(_OWNER_COLUMNS) if self._has_owner_columns else "NULL, NULL"
        rows = self._retry(
            lambda: self.conn.execute(f"SELECT {', '.join(_RUN_COLUMNS)}, {owner} FROM runs ORDER BY rowid").fetchall()
        )
        frame = pd.DataFrame(rows, columns=[*_RUN_COLUMNS, *_OWNER_COLUMNS])
        frame["stored_status"] = frame["status"]
        here = _host()
        gone = [
            status == "running" and host == here and pid is not None and pid == pid and not pid_alive(int(pid))
            for status, pid, host in zip(frame["status"], frame["pid"], frame["host"])
        ]
        frame.loc[pd.Series(gone, index=frame.index, dtype=bool), "status"] = "interrupted"
        return frame

    def metrics(
        self,
        run_id: str | Iterable[str] | None = None,
        metric: str | Iterable[str] | None = None,
        layer: str | Iterable[str] | None = None,
        benchmark: str | None = None,
    ) -> "pd.DataFrame":
        """Metric rows (optionally filtered) joined with their run's benchmark, preset, method and seed.

        Columns: run_id, benchmark, preset, method, seed, step, task, layer, metric, value (NaN where the
        value was NaN). Rows come per run in the order they were written.
        """
        clauses, params = [], []
        for column, wanted in (("m.run_id", run_id), ("m.metric", metric), ("m.layer", layer), ("r.benchmark", benchmark)):
            if wanted is None:
                continue
            values = [wanted] if isinstance(wanted, str) else list(wanted)
            clauses.append(f"{column} IN ({', '.join('?' for _ in values)})" if values else "0")
            params.extend(values)
        import pandas as pd

        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        query = (
            "SELECT m.run_id, r.benchmark, r.preset, r.method, r.seed, m.step, m.task, m.layer, m.metric, m.value "
            f"FROM metrics AS m JOIN runs AS r ON r.run_id = m.run_id {where} ORDER BY r.rowid, m.rowid"
        )
        rows = self._retry(lambda: self.conn.execute(query, params).fetchall())
        frame = pd.DataFrame(rows, columns=list(_METRIC_COLUMNS))
        frame["value"] = pd.to_numeric(frame["value"], errors="coerce").astype("float64")
        for column in ("seed", "step", "task"):
            frame[column] = frame[column].astype("int64")
        return frame


def _as_real(value: Any) -> float | None:
    """A row value as a float for SQLite (NaN is stored as NULL, which SQLite would do anyway)."""
    value = float(value)
    return None if value != value else value

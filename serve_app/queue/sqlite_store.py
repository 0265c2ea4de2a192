"""The embedded job store: one SQLite file (WAL), shared by the router replicas of one node.

Every statement runs on one thread that owns the connection; each multi-statement change is one
`BEGIN IMMEDIATE` transaction, so router replicas in other processes on the node serialise on the
file's write lock rather than race. Survives a restart of `serve run`: the file is the queue.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from serve_app.queue.store import (
    CANCELLED,
    PRIORITY_RANK,
    AdmissionLimits,
    CancelResult,
    JobRecord,
    JobState,
    NewJob,
    Outcome,
    QueueFull,
    new_gateway_id,
    now,
)
from serve_app.rate_limits import take_from_bucket

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT UNIQUE NOT NULL,
    app TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    payload BLOB NOT NULL,
    key_id TEXT NOT NULL,
    base_url TEXT NOT NULL,
    priority INTEGER NOT NULL,
    webhook_url TEXT,
    no_retry INTEGER NOT NULL,
    start_deadline REAL,
    runner_hint TEXT,
    state TEXT NOT NULL,
    gateway_request_id TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    lease_owner TEXT,
    lease_until REAL,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    status_code INTEGER,
    result BLOB,
    metrics TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs (state, priority, seq);
CREATE INDEX IF NOT EXISTS jobs_lease ON jobs (state, lease_until);
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs (state, finished_at);
CREATE TABLE IF NOT EXISTS job_logs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL,
    entry TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS job_logs_request ON job_logs (request_id, id);
CREATE TABLE IF NOT EXISTS webhooks (
    request_id TEXT PRIMARY KEY,
    state TEXT NOT NULL,           -- pending | delivered | failed
    due_at REAL NOT NULL,          -- next attempt, or the end of the running attempt's lease
    attempts INTEGER NOT NULL DEFAULT 0,
    owner TEXT,
    error TEXT
);
CREATE INDEX IF NOT EXISTS webhooks_due ON webhooks (state, due_at);
CREATE TABLE IF NOT EXISTS shared_values (name TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS sync_runs (holder TEXT NOT NULL, key_id TEXT NOT NULL, count INTEGER NOT NULL, PRIMARY KEY (holder, key_id));
CREATE TABLE IF NOT EXISTS sync_holders (holder TEXT PRIMARY KEY, expires_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS rate_buckets (name TEXT PRIMARY KEY, tokens REAL NOT NULL, updated REAL NOT NULL);
"""

# Every column of `jobs` but the bodies (payload, result): what a status poll reads.
_LIGHT_COLUMNS = ", ".join(
    line.split()[0] for line in SCHEMA.split("CREATE TABLE IF NOT EXISTS jobs (")[1].split(");")[0].strip().splitlines()
    if line.split()[0] not in ("payload", "result")
)

# How many queued jobs a claim looks past when the first ones' keys are at their running limit.
CLAIM_WINDOW = 256


def _record(row: sqlite3.Row, logs: list[dict[str, Any]] | None = None, webhook: sqlite3.Row | None = None) -> JobRecord:
    return JobRecord(
        request_id=row["request_id"],
        app=row["app"],
        endpoint=row["endpoint"],
        payload=bytes(row["payload"]),
        key_id=row["key_id"],
        base_url=row["base_url"],
        priority="normal" if row["priority"] == 0 else "low",
        webhook_url=row["webhook_url"],
        no_retry=bool(row["no_retry"]),
        start_deadline=row["start_deadline"],
        runner_hint=row["runner_hint"],
        state=JobState(row["state"]),
        gateway_request_id=row["gateway_request_id"],
        attempts=row["attempts"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        lease_owner=row["lease_owner"],
        lease_until=row["lease_until"],
        cancel_requested=bool(row["cancel_requested"]),
        status_code=row["status_code"],
        result=bytes(row["result"]) if row["result"] is not None else None,
        metrics=json.loads(row["metrics"]),
        logs=logs or [],
        webhook_state=webhook["state"] if webhook else None,
        webhook_attempts=webhook["attempts"] if webhook else 0,
        webhook_error=webhook["error"] if webhook else None,
    )


def _announce(db: sqlite3.Connection, request_id: str, at: float) -> None:
    """A just-completed job with a webhook URL gets its delivery, in the same transaction."""
    db.execute(
        "INSERT OR IGNORE INTO webhooks (request_id, state, due_at) SELECT request_id, 'pending', ? FROM jobs"
        " WHERE request_id = ? AND webhook_url IS NOT NULL",
        (at, request_id),
    )


class SqliteJobStore:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="sqlite-store")
        self._db: sqlite3.Connection | None = None

    # --- plumbing ---------------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            db = sqlite3.connect(self.path, isolation_level=None, timeout=30, check_same_thread=False)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process crashes
            db.executescript(SCHEMA)
            self._db = db
        return self._db

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def _transaction(self, fn, *args):
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            result = fn(db, *args)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return result

    async def close(self) -> None:
        def close() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        await self._run(close)
        self._thread.shutdown(wait=False)

    # --- submit and read --------------------------------------------------------------------

    async def submit(self, job: NewJob, limits: AdmissionLimits = AdmissionLimits()) -> JobRecord:
        def submit(db: sqlite3.Connection) -> None:
            if limits.max_queued is not None:
                (queued,) = db.execute("SELECT COUNT(*) FROM jobs WHERE state = 'IN_QUEUE'").fetchone()
                if queued >= limits.max_queued:
                    raise QueueFull(f"the queue is full ({queued} jobs waiting)")
            if limits.max_queued_per_key is not None:
                (mine,) = db.execute("SELECT COUNT(*) FROM jobs WHERE state = 'IN_QUEUE' AND key_id = ?", (job.key_id,)).fetchone()
                if mine >= limits.max_queued_per_key:
                    raise QueueFull(f"this key already has {mine} jobs waiting (at most {limits.max_queued_per_key})")
            created = now()
            db.execute(
                "INSERT INTO jobs (request_id, app, endpoint, payload, key_id, base_url, priority, webhook_url, no_retry, start_deadline,"
                " runner_hint, state, gateway_request_id, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'IN_QUEUE', ?, ?)",
                (
                    job.request_id, job.app, job.endpoint, job.payload, job.key_id, job.base_url, PRIORITY_RANK[job.priority], job.webhook_url,
                    int(job.no_retry), created + job.start_timeout_s if job.start_timeout_s else None, job.runner_hint,
                    job.request_id, created,
                ),
            )

        await self._run(self._transaction, submit)
        record = await self.get(job.request_id)
        assert record is not None
        return record

    def _get(self, request_id: str, app: str | None, bodies: bool = True, logs: bool = True) -> JobRecord | None:
        db = self._conn()
        columns = "*" if bodies else f"{_LIGHT_COLUMNS}, x'' AS payload, NULL AS result"
        row = db.execute(f"SELECT {columns} FROM jobs WHERE request_id = ?", (request_id,)).fetchone()  # noqa: S608 - constant columns
        if row is None or (app is not None and row["app"] != app):
            return None
        entries = db.execute("SELECT entry FROM job_logs WHERE request_id = ? ORDER BY id", (request_id,)) if logs else []
        webhook = db.execute("SELECT state, attempts, error FROM webhooks WHERE request_id = ?", (request_id,)).fetchone()
        return _record(row, [json.loads(entry) for (entry,) in entries], webhook)

    async def get(self, request_id: str, app: str | None = None, bodies: bool = True, logs: bool = True) -> JobRecord | None:
        return await self._run(self._get, request_id, app, bodies, logs)

    async def position(self, request_id: str) -> int | None:
        def position() -> int | None:
            db = self._conn()
            row = db.execute("SELECT state, priority, seq FROM jobs WHERE request_id = ?", (request_id,)).fetchone()
            if row is None or row["state"] != "IN_QUEUE":
                return None
            (ahead,) = db.execute(
                "SELECT COUNT(*) FROM jobs WHERE state = 'IN_QUEUE' AND (priority < ? OR (priority = ? AND seq < ?))",
                (row["priority"], row["priority"], row["seq"]),
            ).fetchone()
            return ahead

        return await self._run(position)

    # --- the dispatcher's side --------------------------------------------------------------

    async def claim(self, worker: str, lease_s: float, apps: set[str] | None = None, max_running_per_key: int | None = None) -> JobRecord | None:
        def claim(db: sqlite3.Connection) -> str | None:
            where, args = "state = 'IN_QUEUE'", []
            if apps is not None:
                if not apps:
                    return None
                where += f" AND app IN ({', '.join('?' * len(apps))})"
                args += sorted(apps)
            candidates = db.execute(f"SELECT request_id, key_id FROM jobs WHERE {where} ORDER BY priority, seq LIMIT {CLAIM_WINDOW}", args).fetchall()
            running: dict[str, int] = {}
            for request_id, key_id in candidates:
                if max_running_per_key is not None:
                    if key_id not in running:  # its queued jobs running, and its sync calls on live routers
                        (running[key_id],) = db.execute(
                            "SELECT (SELECT COUNT(*) FROM jobs WHERE state = 'IN_PROGRESS' AND key_id = ?) + (SELECT COALESCE(SUM(count), 0)"
                            " FROM sync_runs JOIN sync_holders USING (holder) WHERE key_id = ? AND expires_at > ?)",
                            (key_id, key_id, now()),
                        ).fetchone()
                    if running[key_id] >= max_running_per_key:
                        continue
                started = now()
                db.execute(
                    "UPDATE jobs SET state = 'IN_PROGRESS', lease_owner = ?, lease_until = ?, attempts = attempts + 1,"
                    " started_at = ? WHERE request_id = ?",
                    (worker, started + lease_s, started, request_id),
                )
                return request_id
            return None

        request_id = await self._run(self._transaction, claim)
        return await self.get(request_id) if request_id else None

    async def renew(self, request_id: str, worker: str, lease_s: float) -> bool:
        def renew() -> bool:
            cursor = self._conn().execute(
                "UPDATE jobs SET lease_until = ? WHERE request_id = ? AND state = 'IN_PROGRESS' AND lease_owner = ?",
                (now() + lease_s, request_id, worker),
            )
            return cursor.rowcount == 1

        return await self._run(renew)

    async def append_log(self, request_id: str, entry: dict[str, Any]) -> None:
        await self._run(lambda: self._conn().execute("INSERT INTO job_logs (request_id, entry) VALUES (?, ?)", (request_id, json.dumps(entry))))

    async def finish(self, request_id: str, worker: str | None, outcome: Outcome) -> bool:
        def finish(db: sqlite3.Connection) -> bool:
            owner = "lease_owner = ? AND state = 'IN_PROGRESS'" if worker is not None else "state != 'COMPLETED'"
            args: tuple = (worker,) if worker is not None else ()
            finished = now()
            cursor = db.execute(
                "UPDATE jobs SET state = 'COMPLETED', status_code = ?, result = ?, metrics = ?, finished_at = ?, lease_owner = NULL,"
                f" lease_until = NULL, payload = x'' WHERE request_id = ? AND {owner}",
                (outcome.status_code, outcome.body, json.dumps(outcome.metrics), finished, request_id, *args),
            )
            if cursor.rowcount != 1:
                return False
            _announce(db, request_id, finished)
            return True

        return await self._run(self._transaction, finish)

    async def cancel(self, request_id: str, app: str | None = None) -> CancelResult:
        def cancel(db: sqlite3.Connection) -> CancelResult:
            row = db.execute("SELECT app, state FROM jobs WHERE request_id = ?", (request_id,)).fetchone()
            if row is None or (app is not None and row["app"] != app):
                return "not_found"
            if row["state"] == "COMPLETED":
                return "already_completed"
            if row["state"] == "IN_PROGRESS":
                db.execute("UPDATE jobs SET cancel_requested = 1 WHERE request_id = ?", (request_id,))
                return "requested"
            finished = now()
            db.execute(
                "UPDATE jobs SET state = 'COMPLETED', status_code = ?, result = ?, finished_at = ?, payload = x'' WHERE request_id = ?",
                (CANCELLED.status_code, CANCELLED.body, finished, request_id),
            )
            _announce(db, request_id, finished)
            return "cancelled"

        return await self._run(self._transaction, cancel)

    async def cancel_requested(self, request_id: str) -> bool:
        row = await self._run(lambda: self._conn().execute("SELECT cancel_requested FROM jobs WHERE request_id = ?", (request_id,)).fetchone())
        return bool(row and row[0])

    @staticmethod
    def _requeue(db: sqlite3.Connection, request_id: str) -> None:
        """Back to the head of its priority (its seq is older than anything still queued)."""
        db.execute(
            "UPDATE jobs SET state = 'IN_QUEUE', lease_owner = NULL, lease_until = NULL, started_at = NULL, gateway_request_id = ? WHERE request_id = ?",
            (new_gateway_id(), request_id),
        )

    async def requeue_expired(self, max_attempts: int | None = None) -> tuple[list[str], list[JobRecord]]:
        def requeue(db: sqlite3.Connection) -> tuple[list[str], list[str]]:
            expired = db.execute("SELECT request_id, no_retry, attempts FROM jobs WHERE state = 'IN_PROGRESS' AND lease_until < ?", (now(),)).fetchall()
            requeued, handed_back = [], []
            for request_id, no_retry, attempts in expired:
                if no_retry or (max_attempts is not None and attempts >= max_attempts):
                    # Its worker is gone and it must not run again: the caller completes it.
                    db.execute("UPDATE jobs SET lease_owner = NULL, lease_until = NULL WHERE request_id = ?", (request_id,))
                    handed_back.append(request_id)
                else:
                    self._requeue(db, request_id)
                    requeued.append(request_id)
            return requeued, handed_back

        requeued, handed_back = await self._run(self._transaction, requeue)
        return requeued, [r for r in [await self.get(request_id) for request_id in handed_back] if r is not None]

    async def release(self, request_id: str, worker: str) -> bool:
        def release(db: sqlite3.Connection) -> bool:
            row = db.execute("SELECT 1 FROM jobs WHERE request_id = ? AND state = 'IN_PROGRESS' AND lease_owner = ?", (request_id, worker)).fetchone()
            if row is not None:
                self._requeue(db, request_id)
            return row is not None

        return await self._run(self._transaction, release)

    async def expired_unstarted(self) -> list[JobRecord]:
        def expired() -> list[str]:
            rows = self._conn().execute("SELECT request_id FROM jobs WHERE state = 'IN_QUEUE' AND start_deadline < ?", (now(),))
            return [request_id for (request_id,) in rows]

        return [r for r in [await self.get(request_id) for request_id in await self._run(expired)] if r is not None]

    async def purge(self, older_than_s: float) -> int:
        def purge(db: sqlite3.Connection) -> int:
            cutoff = now() - older_than_s
            # A job whose webhook is still being delivered is kept: the delivery reads its result.
            done = "state = 'COMPLETED' AND finished_at < ? AND request_id NOT IN (SELECT request_id FROM webhooks WHERE state = 'pending')"
            for table in ("job_logs", "webhooks"):
                db.execute(f"DELETE FROM {table} WHERE request_id IN (SELECT request_id FROM jobs WHERE {done})", (cutoff,))
            return db.execute(f"DELETE FROM jobs WHERE {done}", (cutoff,)).rowcount

        return await self._run(self._transaction, purge)

    async def depth(self, app: str | None = None) -> int:
        def depth() -> int:
            if app is None:
                return self._conn().execute("SELECT COUNT(*) FROM jobs WHERE state = 'IN_QUEUE'").fetchone()[0]
            return self._conn().execute("SELECT COUNT(*) FROM jobs WHERE state = 'IN_QUEUE' AND app = ?", (app,)).fetchone()[0]

        return await self._run(depth)

    async def running(self, key_id: str | None = None) -> int:
        def running() -> int:
            if key_id is None:
                return self._conn().execute("SELECT COUNT(*) FROM jobs WHERE state = 'IN_PROGRESS'").fetchone()[0]
            return self._conn().execute("SELECT COUNT(*) FROM jobs WHERE state = 'IN_PROGRESS' AND key_id = ?", (key_id,)).fetchone()[0]

        return await self._run(running)

    # --- webhooks ---------------------------------------------------------------------------

    async def claim_webhook(self, worker: str, lease_s: float) -> JobRecord | None:
        def claim(db: sqlite3.Connection) -> str | None:
            moment = now()
            row = db.execute(
                "SELECT request_id FROM webhooks WHERE state = 'pending' AND due_at <= ? ORDER BY due_at LIMIT 1", (moment,)
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE webhooks SET due_at = ?, owner = ?, attempts = attempts + 1 WHERE request_id = ?", (moment + lease_s, worker, row[0])
            )
            return row[0]

        request_id = await self._run(self._transaction, claim)
        return await self.get(request_id) if request_id else None

    async def webhook_attempted(self, request_id: str, worker: str, delivered: bool, error: str | None, retry_at: float | None) -> bool:
        state = "delivered" if delivered else ("pending" if retry_at is not None else "failed")

        def attempted() -> bool:
            cursor = self._conn().execute(
                "UPDATE webhooks SET state = ?, due_at = ?, owner = NULL, error = ? WHERE request_id = ? AND owner = ? AND state = 'pending'",
                (state, retry_at if retry_at is not None else now(), error, request_id, worker),
            )
            return cursor.rowcount == 1

        return await self._run(attempted)

    async def enter_sync_run(self, key_id: str, holder: str, limit: int, ttl_s: float) -> bool:
        def enter(db: sqlite3.Connection) -> bool:
            t = now()
            db.execute("DELETE FROM sync_runs WHERE holder IN (SELECT holder FROM sync_holders WHERE expires_at <= ?)", (t,))
            db.execute("DELETE FROM sync_holders WHERE expires_at <= ?", (t,))
            (running,) = db.execute("SELECT COUNT(*) FROM jobs WHERE state = 'IN_PROGRESS' AND key_id = ?", (key_id,)).fetchone()
            (sync,) = db.execute("SELECT COALESCE(SUM(count), 0) FROM sync_runs WHERE key_id = ?", (key_id,)).fetchone()
            if running + sync >= limit:
                return False
            db.execute(
                "INSERT INTO sync_runs (holder, key_id, count) VALUES (?, ?, 1) ON CONFLICT(holder, key_id) DO UPDATE SET count = count + 1",
                (holder, key_id),
            )
            db.execute("INSERT OR REPLACE INTO sync_holders (holder, expires_at) VALUES (?, ?)", (holder, t + ttl_s))
            return True

        return await self._run(self._transaction, enter)

    async def leave_sync_run(self, key_id: str, holder: str) -> None:
        def leave(db: sqlite3.Connection) -> None:
            db.execute("UPDATE sync_runs SET count = count - 1 WHERE holder = ? AND key_id = ?", (holder, key_id))
            db.execute("DELETE FROM sync_runs WHERE holder = ? AND key_id = ? AND count <= 0", (holder, key_id))

        await self._run(self._transaction, leave)

    async def renew_sync_runs(self, holder: str, counts: dict[str, int], ttl_s: float) -> None:
        def renew(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM sync_runs WHERE holder = ?", (holder,))
            db.executemany("INSERT INTO sync_runs (holder, key_id, count) VALUES (?, ?, ?)", [(holder, k, n) for k, n in counts.items() if n > 0])
            db.execute("INSERT OR REPLACE INTO sync_holders (holder, expires_at) VALUES (?, ?)", (holder, now() + ttl_s))

        await self._run(self._transaction, renew)

    async def take_token(self, bucket: str, capacity: float, refill_per_s: float) -> float:
        def take(db: sqlite3.Connection) -> float:
            t = now()
            row = db.execute("SELECT tokens, updated FROM rate_buckets WHERE name = ?", (bucket,)).fetchone()
            tokens, wait = take_from_bucket(*((row["tokens"], t - row["updated"]) if row else (capacity, 0.0)), capacity, refill_per_s)
            db.execute(
                "INSERT INTO rate_buckets (name, tokens, updated) VALUES (?, ?, ?) "
                "ON CONFLICT(name) DO UPDATE SET tokens = excluded.tokens, updated = excluded.updated",
                (bucket, tokens, t),
            )
            return wait

        return await self._run(self._transaction, take)

    async def shared_value(self, name: str, make: bytes) -> bytes:
        def shared(db: sqlite3.Connection) -> bytes:
            db.execute("INSERT OR IGNORE INTO shared_values (name, value) VALUES (?, ?)", (name, make))
            return bytes(db.execute("SELECT value FROM shared_values WHERE name = ?", (name,)).fetchone()[0])

        return await self._run(self._transaction, shared)

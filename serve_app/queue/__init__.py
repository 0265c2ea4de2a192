"""fal's queue on a durable job store: records and the store interface (store.py), SQLite
(sqlite_store.py) and Redis (redis_store.py) behind it, chosen by URL (`open_store`)."""

from __future__ import annotations

from urllib.parse import urlsplit

from serve_app.queue.store import JobStore


def open_store(url: str, password: str | None = None) -> JobStore:
    """`sqlite:///absolute/path.sqlite3` (`sqlite:///~/…` too) for one node, `redis://host:port/db`
    (or `rediss://`) for a cluster; a Redis URL may end in `#prefix` to share a server. A Redis
    `password` given here wins over one in the URL."""
    scheme = urlsplit(url).scheme
    if scheme == "sqlite":
        from serve_app.queue.sqlite_store import SqliteJobStore

        path = url.removeprefix("sqlite://")
        return SqliteJobStore(path[1:] if path.startswith("/~") else path)
    if scheme in ("redis", "rediss", "unix"):
        from serve_app.queue.redis_store import RedisJobStore

        base, _, prefix = url.partition("#")
        return RedisJobStore(base, prefix=prefix or "diffusion-serve:", password=password)
    raise ValueError(f"unknown job store URL {url!r}: use sqlite:///path/to/jobs.sqlite3 or redis://host:6379/0")

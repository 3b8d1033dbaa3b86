"""The database: one engine per process, one session per request, migrations by Alembic.

``DATABASE_URL`` names it (PostgreSQL in production: ``postgresql+psycopg://...``); the default is a
SQLite file under ``var/`` beside the checkout. ``AISIGHT_STORE=on`` turns the clinicians' side on (the
``make run`` default); off, the anonymous screening page and API work without any database.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from flask import Flask, current_app, g
from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

ROOT = Path(__file__).resolve().parent.parent.parent
DEFAULT_URL = f"sqlite:///{ROOT / 'var' / 'aisight.db'}"
TRUE = ("1", "on", "true", "yes")


def env_flag(name: str, default: bool, env: Mapping[str, str] | None = None) -> bool:
    """An on/off setting: 1/on/true/yes is on, any other value off, unset or empty the default."""
    value = ((env if env is not None else os.environ).get(name) or "").strip().lower()
    return value in TRUE if value else default


def store_enabled(env: Mapping[str, str] | None = None) -> bool:
    return env_flag("AISIGHT_STORE", False, env)


def database_url(env: Mapping[str, str] | None = None) -> str:
    return ((env if env is not None else os.environ).get("DATABASE_URL") or DEFAULT_URL).strip()


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets foreign keys on and its folder created."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _fk_on(dbapi_conn, _record) -> None:  # SQLite ignores ON DELETE without it
            dbapi_conn.execute("PRAGMA foreign_keys = ON")

        return engine
    return create_engine(url, pool_pre_ping=True)


def upgrade(url: str) -> None:
    """Bring the database at ``url`` to the newest migration (idempotent)."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(ROOT / "migrations"))
    cfg.attributes["url"] = url
    command.upgrade(cfg, "head")


class Store:
    """The app's database handle (``app.extensions['aisight']['store']``)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session outside a request (CLI, jobs): committed on success, rolled back on error."""
        with self.sessions() as s, s.begin():
            yield s


def init_app(app: Flask) -> None:
    """Open the store named by the config (``DATABASE_URL``) and close each request's session after it."""
    store = Store(app.config["DATABASE_URL"])
    if app.config.get("DB_UPGRADE"):
        upgrade(store.url)
    app.extensions["aisight"]["store"] = store

    @app.teardown_appcontext
    def _close(exc: BaseException | None) -> None:
        s = g.pop("db", None)
        if s is not None:
            if exc is None:
                s.commit()
            else:
                s.rollback()
            s.close()


def db() -> Session:
    """This request's session (committed when the request ends without an error)."""
    if "db" not in g:
        g.db = current_app.extensions["aisight"]["store"].sessions()
    return g.db

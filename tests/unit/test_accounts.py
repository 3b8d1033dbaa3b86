"""Clinician accounts against real databases (SQLite and PostgreSQL): CLI, sign-in, sessions, CSRF, limits."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from sqlalchemy import select

from aisight.store import Store, make_engine, upgrade
from aisight.store.models import AuditEvent, Base, User
from app import create_app
from tests.conftest import ROOT

PASSWORD = "correct horse battery"


def cli(url: str, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    """The operator command, as an operator runs it (no app, no model)."""
    return subprocess.run([sys.executable, "-m", "aisight.cli", *args], input=stdin, capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "DATABASE_URL": url, "PYTHONPATH": str(ROOT)}, timeout=120)


@pytest.fixture
def accounts_app(database_url, model_dir):
    created = cli(database_url, "users", "create", "alice", "--password-stdin", stdin=PASSWORD + "\n")
    assert created.returncode == 0, created.stderr
    assert cli(database_url, "users", "create", "root", "--role", "admin", "--password-stdin",
               stdin=PASSWORD + "\n").returncode == 0
    app = create_app({"MODEL_DIR": str(model_dir), "MODEL_LOAD": "none", "STORE": True, "DATABASE_URL": database_url,
                      "SECRET_KEY": "test-secret-key", "TESTING": True})
    yield app
    app.extensions["aisight"]["store"].engine.dispose()


def csrf(client, path: str = "/login") -> str:
    html = client.get(path).get_data(as_text=True)
    return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)


def sign_in(client, username: str = "alice", password: str = PASSWORD, next_: str = ""):
    token = csrf(client)
    url = "/login" + (f"?next={next_}" if next_ else "")
    return client.post(url, data={"username": username, "password": password, "csrf_token": token})


def events(app) -> list[tuple[str, str]]:
    with app.extensions["aisight"]["store"].session() as s:
        return [(e.actor, e.action) for e in s.scalars(select(AuditEvent).order_by(AuditEvent.id))]


def test_migrations_build_exactly_the_models(database_url):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    upgrade(database_url)
    upgrade(database_url)  # idempotent: the migrate Job may run on every rollout
    engine = make_engine(database_url)
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    engine.dispose()


def test_cli_creates_disables_and_resets(database_url):
    assert cli(database_url, "users", "create", "bob", "--password-stdin", stdin="short\n").returncode != 0
    assert cli(database_url, "users", "create", "bob", "--password-stdin", stdin=PASSWORD + "\n").returncode == 0
    again = cli(database_url, "users", "create", "bob", "--password-stdin", stdin=PASSWORD + "\n")
    assert again.returncode != 0 and "exists" in again.stderr
    assert cli(database_url, "users", "disable", "bob").returncode == 0
    store = Store(database_url)
    with store.session() as s:
        bob = s.scalar(select(User).where(User.username == "bob"))
        assert not bob.active and bob.password_hash.startswith("$argon2id$") and PASSWORD not in bob.password_hash
    reset = cli(database_url, "users", "reset-password", "bob", "--password-stdin", stdin="another long one\n")
    assert reset.returncode == 0
    with store.session() as s:
        assert s.scalar(select(User).where(User.username == "bob")).active
    assert cli(database_url, "users", "disable", "nobody").returncode != 0
    store.engine.dispose()


def test_sign_in_and_out(accounts_app):
    c = accounts_app.test_client()
    r = c.get("/account")
    assert r.status_code == 302 and r.headers["Location"].startswith("/login?next=/account")
    assert sign_in(c, password="wrong password!").status_code == 401
    r = sign_in(c, next_="/account")
    assert r.status_code == 302 and r.headers["Location"] == "/account"
    cookie = r.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Secure" not in cookie
    assert 'data-role="clinician"' in c.get("/account").get_data(as_text=True)
    r = c.post("/logout", data={"csrf_token": csrf(c, "/account")})
    assert r.status_code == 302 and c.get("/account").status_code == 302
    assert events(accounts_app) == [("cli", "user_created"), ("cli", "user_created"), ("anonymous", "login_failed"),
                                    ("alice", "login"), ("alice", "logout")]


def test_secure_cookie_behind_https(database_url, model_dir, monkeypatch):
    monkeypatch.setenv("AISIGHT_SECURE_COOKIES", "on")
    assert cli(database_url, "users", "create", "alice", "--password-stdin", stdin=PASSWORD + "\n").returncode == 0
    app = create_app({"MODEL_DIR": str(model_dir), "MODEL_LOAD": "none", "STORE": True, "DATABASE_URL": database_url,
                      "SECRET_KEY": "k"})
    assert "Secure" in sign_in(app.test_client()).headers["Set-Cookie"]
    app.extensions["aisight"]["store"].engine.dispose()


def test_forms_need_the_csrf_token(accounts_app):
    c = accounts_app.test_client()
    r = c.post("/login", data={"username": "alice", "password": PASSWORD})
    assert r.status_code == 403 and "csrf_failed" in r.get_data(as_text=True)
    sign_in(c)
    assert c.post("/logout", data={"csrf_token": "forged"}).status_code == 403
    assert c.get("/account").status_code == 200  # still signed in


def test_no_session_fixation_and_server_side_logout(accounts_app):
    c = accounts_app.test_client()
    csrf(c)  # the browser has a session cookie before signing in
    before = c.get_cookie("session").value
    sign_in(c)
    after = c.get_cookie("session").value
    assert after != before
    attacker = accounts_app.test_client()
    attacker.set_cookie("session", before)  # the pre-login cookie grants nothing
    assert attacker.get("/account").status_code == 302
    attacker.set_cookie("session", after)  # a stolen cookie works only until the owner signs out
    assert attacker.get("/account").status_code == 200
    c.post("/logout", data={"csrf_token": csrf(c, "/account")})
    assert attacker.get("/account").status_code == 302


def test_disabling_a_user_ends_their_sessions(accounts_app, database_url):
    c = accounts_app.test_client()
    sign_in(c)
    assert c.get("/account").status_code == 200
    assert cli(database_url, "users", "disable", "alice").returncode == 0
    assert c.get("/account").status_code == 302
    assert sign_in(c).status_code == 401


def test_login_rate_limit(accounts_app):
    c = accounts_app.test_client()
    for _ in range(5):
        assert sign_in(c, password="not the password").status_code == 401
    r = sign_in(c)  # the right password, but the name is locked for 15 minutes
    assert r.status_code == 429 and "Too many failed sign-ins" in r.get_data(as_text=True)
    assert sign_in(accounts_app.test_client(), "root").status_code == 302  # another account is not locked


def test_next_is_never_an_open_redirect(accounts_app):
    for target in ("//evil.example/x", "https://evil.example/", "/\\evil"):
        r = sign_in(accounts_app.test_client(), next_=target)
        assert r.status_code == 302 and not r.headers["Location"].lstrip("/").startswith(("evil", "http", "\\"))


def test_without_the_store_there_are_no_account_pages(model_dir):
    app = create_app({"MODEL_DIR": str(model_dir), "MODEL_LOAD": "none", "STORE": False})
    c = app.test_client()
    assert c.get("/login").status_code == 404 and c.get("/account").status_code == 404
    assert "Clinician sign-in" not in c.get("/").get_data(as_text=True)

"""Clinician accounts: sign-in and sign-out, sessions held server-side, CSRF tokens, the login rate limit.

Passwords are hashed with argon2id. The signed session cookie (HttpOnly, SameSite=Lax, Secure behind
HTTPS) carries only a random token whose SHA-256 names a row of ``login_sessions``; signing in replaces
any token the browser had (no session fixation), signing out or disabling the user deletes the row.
Every state-changing form carries a CSRF token tied to the session.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import hmac
import secrets
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from flask import Blueprint, Flask, abort, current_app, g, redirect, render_template, request, session, url_for
from sqlalchemy import delete, func, select

from aisight.store import db
from aisight.store.models import AuditEvent, LoginFailure, LoginSession, User, utcnow

bp = Blueprint("account", __name__)
hasher = PasswordHasher()
# The login rate limit: this many failures in the window lock a username (or an address) out for the window.
FAILURES_PER_USER = 5
FAILURES_PER_ADDRESS = 20
FAILURE_WINDOW = dt.timedelta(minutes=15)
# Hash a dummy password when the user does not exist, so that timing does not tell which names exist.
_DUMMY_HASH = hasher.hash(secrets.token_hex(16))


def hash_password(password: str) -> str:
    if len(password) < 10:
        raise ValueError("a password needs at least 10 characters")
    return hasher.hash(password)


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def client_address() -> str:
    return (request.remote_addr or "")[:64]


def audit(action: str, target: str = "", detail: str = "", user: User | None = None) -> None:
    """Record who did ``action`` to ``target`` (in this request's transaction)."""
    user = user if user is not None else current_user()
    db().add(AuditEvent(user_id=user.id if user else None, actor=user.username if user else "anonymous",
                        action=action, target=target[:128], address=client_address(), detail=detail))


def current_user() -> User | None:
    """The signed-in, active user of this request, or None."""
    if "user" not in g:
        g.user = None
        token = session.get("sid")
        if isinstance(token, str):
            row = db().get(LoginSession, _token_hash(token))
            if row is not None and row.expires > utcnow():
                user = db().get(User, row.user_id)
                g.user = user if user is not None and user.active else None
    return g.user


def csrf_token() -> str:
    """This session's CSRF token (made on first use); forms put it in a hidden ``csrf_token`` field."""
    if not isinstance(session.get("csrf"), str):
        session["csrf"] = secrets.token_urlsafe(32)
    return session["csrf"]


def check_csrf() -> None:
    """Refuse (403) a form post whose CSRF token is missing or not this session's."""
    sent = request.form.get("csrf_token", "")
    mine = session.get("csrf")
    if not isinstance(mine, str) or not hmac.compare_digest(sent.encode(), mine.encode()):
        from aisight.pipeline import ApiError

        raise ApiError("csrf_failed", "This form has expired or did not come from this site. Reload the page "
                       "and try again.", 403)


def login_required(role: str | None = None) -> Callable:
    """Views for signed-in users (of ``role``, if given; admins pass every role check)."""

    def wrap(view: Callable) -> Callable:
        @functools.wraps(view)
        def inner(*args: Any, **kwargs: Any):
            user = current_user()
            if user is None:
                return redirect(url_for("account.login", next=request.full_path.rstrip("?")))
            if role is not None and user.role not in (role, "admin"):
                abort(403)
            if request.method == "POST":
                check_csrf()
            return view(*args, **kwargs)

        return inner

    return wrap


def _safe_next(target: str | None) -> str:
    """Only a path on this site: never an absolute URL or a scheme-relative one (an open redirect)."""
    if target and target.startswith("/") and not target.startswith("//") and not urlsplit(target).netloc:
        return target
    return url_for("account.home")


def _locked_out(username: str) -> bool:
    since = utcnow() - FAILURE_WINDOW
    s = db()
    by_user = s.scalar(select(func.count()).select_from(LoginFailure).where(
        LoginFailure.username == username, LoginFailure.at >= since))
    by_address = s.scalar(select(func.count()).select_from(LoginFailure).where(
        LoginFailure.address == client_address(), LoginFailure.at >= since))
    return by_user >= FAILURES_PER_USER or by_address >= FAILURES_PER_ADDRESS


def verify(username: str, password: str) -> User | None:
    """The active user with this password, or None (same work either way)."""
    user = db().scalar(select(User).where(User.username == username))
    try:
        hasher.verify(user.password_hash if user else _DUMMY_HASH, password)
    except (VerificationError, InvalidHashError):
        return None
    if user is None or not user.active:
        return None
    if hasher.check_needs_rehash(user.password_hash):
        user.password_hash = hasher.hash(password)
    return user


def sign_in(user: User) -> None:
    """Start a new session for ``user``: a fresh token (and CSRF token), whatever the browser had before."""
    session.clear()
    token = secrets.token_urlsafe(32)
    hours = current_app.config["SESSION_HOURS"]
    db().add(LoginSession(token_hash=_token_hash(token), user_id=user.id, expires=utcnow() + dt.timedelta(hours=hours)))
    session["sid"] = token
    session.permanent = True
    g.user = user
    csrf_token()


@bp.route("/login", methods=["GET", "POST"])
def login():
    """The sign-in form, and its target."""
    error = None
    status = 200
    if request.method == "POST":
        check_csrf()
        username = request.form.get("username", "").strip()[:64]
        password = request.form.get("password", "")
        if _locked_out(username):
            error, status = "Too many failed sign-ins. Wait 15 minutes and try again.", 429
        elif (user := verify(username, password)) is not None:
            sign_in(user)
            audit("login", f"user:{user.id}", user=user)
            return redirect(_safe_next(request.args.get("next")))
        else:
            db().add(LoginFailure(username=username, address=client_address()))
            audit("login_failed", f"username:{username}", user=None)
            error, status = "Wrong username or password.", 401
    return render_template("login.html", error=error, next=request.args.get("next", "")), status


@bp.post("/logout")
def logout():
    check_csrf()
    token = session.get("sid")
    user = current_user()
    if isinstance(token, str):
        db().execute(delete(LoginSession).where(LoginSession.token_hash == _token_hash(token)))
    if user is not None:
        audit("logout", f"user:{user.id}", user=user)
    session.clear()
    return redirect(url_for("account.login"))


@bp.get("/account")
@login_required()
def home():
    """Who is signed in, and what they may do."""
    return render_template("account.html", user=current_user())


@bp.get("/audit")
@login_required("admin")
def audit_log():
    """The newest 500 audit events (admins only)."""
    rows = db().scalars(select(AuditEvent).order_by(AuditEvent.id.desc()).limit(500)).all()
    return render_template("audit.html", events=rows)


def init_app(app: Flask) -> None:
    """Register the account views and ``csrf_token`` for templates."""
    app.register_blueprint(bp)
    app.jinja_env.globals.update(csrf_token=csrf_token, current_user=current_user)

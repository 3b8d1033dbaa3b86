"""Operator commands: ``flask --app app users create|disable|reset-password``, ``flask --app app db upgrade``.

The same commands run without the app (no model load) as ``python -m aisight.cli ...``. They use the
database named by ``DATABASE_URL`` (default: the SQLite file under var/).
"""

from __future__ import annotations

import sys

import click
from flask import Flask
from sqlalchemy import delete, select

from aisight.store import Store, database_url, upgrade
from aisight.store.models import ROLES, AuditEvent, LoginSession, User

# Plain click groups (not AppGroup): they need no app context, so the model is never loaded for them.
users = click.Group("users", help="Clinician accounts.")
database = click.Group("db", help="The database schema.")


def _password(stdin: bool) -> str:
    from aisight.accounts import hash_password

    text = sys.stdin.readline().rstrip("\n") if stdin else click.prompt("Password", hide_input=True,
                                                                         confirmation_prompt=True)
    try:
        return hash_password(text)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc


def _store() -> Store:
    url = database_url()
    upgrade(url)
    return Store(url)


def _audit(s, action: str, user: User | None = None, detail: str = "") -> None:
    s.add(AuditEvent(user_id=user.id if user else None, actor="cli", action=action,
                     target=f"user:{user.id}" if user else "", address="", detail=detail))


def _end_sessions(s, user: User) -> None:
    s.execute(delete(LoginSession).where(LoginSession.user_id == user.id))


@users.command("create")
@click.argument("username")
@click.option("--role", type=click.Choice(ROLES), default="clinician", show_default=True)
@click.option("--password-stdin", is_flag=True, help="read the password from the first line of stdin")
def create_user(username: str, role: str, password_stdin: bool) -> None:
    """Create an account (asks for its password)."""
    if not username or len(username) > 64 or not username.replace(".", "").replace("-", "").replace("_", "").isalnum():
        raise click.ClickException("a username is 1-64 letters, digits, '.', '-' or '_'")
    hashed = _password(password_stdin)
    with _store().session() as s:
        if s.scalar(select(User).where(User.username == username)):
            raise click.ClickException(f"user {username!r} exists")
        user = User(username=username, password_hash=hashed, role=role, active=True)
        s.add(user)
        s.flush()
        _audit(s, "user_created", user)
    click.echo(f"created {role} {username}")


def _find(s, username: str) -> User:
    user = s.scalar(select(User).where(User.username == username))
    if user is None:
        raise click.ClickException(f"no user {username!r}")
    return user


@users.command("disable")
@click.argument("username")
def disable_user(username: str) -> None:
    """Disable an account and end its sessions."""
    with _store().session() as s:
        user = _find(s, username)
        user.active = False
        _end_sessions(s, user)
        _audit(s, "user_disabled", user)
    click.echo(f"disabled {username}")


@users.command("reset-password")
@click.argument("username")
@click.option("--password-stdin", is_flag=True, help="read the password from the first line of stdin")
def reset_password(username: str, password_stdin: bool) -> None:
    """Set a new password (asks for it), re-enable the account and end its sessions."""
    hashed = _password(password_stdin)
    with _store().session() as s:
        user = _find(s, username)
        user.password_hash, user.active = hashed, True
        _end_sessions(s, user)
        _audit(s, "password_reset", user)
    click.echo(f"password reset for {username}")


@click.command("purge")
@click.option("--days", type=float, default=None, help="retention in days (default AISIGHT_RETENTION_DAYS, 365)")
def purge_command(days: float | None) -> None:
    """Delete consented uploads older than the retention period (run it daily: a k8s CronJob or cron)."""
    import os

    from aisight.store.records import purge

    days = days if days is not None else float(os.environ.get("AISIGHT_RETENTION_DAYS") or 365)
    with _store().session() as s:
        n = purge(s, days)
        _audit(s, "purge", detail=f"{n} photos")
    click.echo(f"deleted {n} consented photos older than {days:g} days")


@database.command("upgrade")
def db_upgrade() -> None:
    """Apply every migration to DATABASE_URL (run before a rollout: the k8s migrate Job)."""
    upgrade(database_url())
    click.echo("database at the newest migration")


def init_app(app: Flask) -> None:
    app.cli.add_command(users)
    app.cli.add_command(database)
    app.cli.add_command(purge_command)


@click.group()
def main() -> None:
    """AI-Sight operator commands."""


main.add_command(users)
main.add_command(database)
main.add_command(purge_command)

if __name__ == "__main__":
    main()

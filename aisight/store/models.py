"""The database tables (SQLAlchemy 2 declarative). Migrations in migrations/ must match them (tested)."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import Boolean, DateTime, Float, ForeignKey, Integer, LargeBinary, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

ROLES = ("clinician", "admin")
READINGS = ("healthy", "diseased", "ungradable")
FINDINGS = ("retinopathy", "glaucoma", "cataract", "other")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)  # stored naive, always UTC


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    password_hash: Mapped[str] = mapped_column(String(255))  # argon2id, with its parameters and salt
    role: Mapped[str] = mapped_column(String(16), default="clinician")
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class LoginSession(Base):
    """A signed-in browser. The cookie carries a random token; only its SHA-256 is stored, so a copy of
    the database does not sign anyone in. Logout, expiry and disabling a user end it server-side."""

    __tablename__ = "login_sessions"

    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    created: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    expires: Mapped[dt.datetime] = mapped_column(DateTime)


class LoginFailure(Base):
    """A failed sign-in, for the login rate limit (per username and per address)."""

    __tablename__ = "login_failures"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), index=True)
    address: Mapped[str] = mapped_column(String(64), index=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)


class AuditEvent(Base):
    """Who did what to which object, and when (sign-ins, account changes, views and edits of records)."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"), nullable=True)
    actor: Mapped[str] = mapped_column(String(64))  # username, or "cli" / "anonymous"
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(128), default="")
    address: Mapped[str] = mapped_column(String(64), default="")
    detail: Mapped[str] = mapped_column(Text, default="")


class Visit(Base):
    """A clinician's visit with a pseudonymous patient (a reference, never a name), both eyes and a note."""

    __tablename__ = "visits"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    public_id: Mapped[str] = mapped_column(String(32), unique=True, index=True)  # random: ids are not guessable
    patient_ref: Mapped[str] = mapped_column(String(64), index=True)
    clinician_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    created: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    note: Mapped[str] = mapped_column(Text, default="")


class StoredPhoto(Base):
    """A photo kept with its screening answer: from a visit, or an anonymous upload whose owner consented.

    The bytes live in the database (never under a static folder); a consented upload is found again only
    by its receipt code, whose SHA-256 is all that is stored.
    """

    __tablename__ = "stored_photos"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    public_id: Mapped[str] = mapped_column(String(32), unique=True, index=True)
    kind: Mapped[str] = mapped_column(String(16), index=True)  # "consent" or "visit"
    visit_id: Mapped[int | None] = mapped_column(ForeignKey("visits.id", ondelete="CASCADE"), nullable=True,
                                                 index=True)
    eye: Mapped[str] = mapped_column(String(8), default="")  # "left", "right" or "" (not said)
    image: Mapped[bytes] = mapped_column(LargeBinary)
    media_type: Mapped[str] = mapped_column(String(32), default="application/octet-stream")
    label: Mapped[str] = mapped_column(String(16))
    probability: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)
    model_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(32), index=True)
    gate: Mapped[str] = mapped_column(Text, default="{}")  # the gate's measures, JSON
    created: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    receipt_hash: Mapped[str | None] = mapped_column(String(64), nullable=True, unique=True)


class Review(Base):
    """A clinician's own reading of a stored photo, to compare the model with."""

    __tablename__ = "reviews"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    photo_id: Mapped[int] = mapped_column(ForeignKey("stored_photos.id", ondelete="CASCADE"), index=True)
    reviewer_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    reading: Mapped[str] = mapped_column(String(16))  # READINGS
    finding: Mapped[str] = mapped_column(String(16), default="")  # FINDINGS, for a diseased reading
    created: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)

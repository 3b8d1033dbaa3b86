"""Alembic environment: the URL comes from aisight.store.upgrade (or DATABASE_URL), the tables from its models."""

from __future__ import annotations

from alembic import context

from aisight.store import database_url, make_engine
from aisight.store.models import Base

url = context.config.attributes.get("url") or database_url()
engine = make_engine(url)
with engine.connect() as connection:
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
engine.dispose()

"""Records: visits, stored photos (visits and consented uploads), reviews.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "visits",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("public_id", sa.String(32), nullable=False),
        sa.Column("patient_ref", sa.String(64), nullable=False),
        sa.Column("clinician_id", sa.Integer(), sa.ForeignKey("users.id"), nullable=False),
        sa.Column("created", sa.DateTime(), nullable=False),
        sa.Column("note", sa.Text(), nullable=False),
    )
    op.create_index("ix_visits_public_id", "visits", ["public_id"], unique=True)
    op.create_index("ix_visits_patient_ref", "visits", ["patient_ref"])
    op.create_index("ix_visits_clinician_id", "visits", ["clinician_id"])
    op.create_index("ix_visits_created", "visits", ["created"])
    op.create_table(
        "stored_photos",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("public_id", sa.String(32), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("visit_id", sa.Integer(), sa.ForeignKey("visits.id", ondelete="CASCADE"), nullable=True),
        sa.Column("eye", sa.String(8), nullable=False),
        sa.Column("image", sa.LargeBinary(), nullable=False),
        sa.Column("media_type", sa.String(32), nullable=False),
        sa.Column("label", sa.String(16), nullable=False),
        sa.Column("probability", sa.Float(), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("model_name", sa.String(64), nullable=False),
        sa.Column("model_version", sa.String(32), nullable=False),
        sa.Column("gate", sa.Text(), nullable=False),
        sa.Column("created", sa.DateTime(), nullable=False),
        sa.Column("receipt_hash", sa.String(64), nullable=True),
        sa.UniqueConstraint("receipt_hash"),
    )
    op.create_index("ix_stored_photos_public_id", "stored_photos", ["public_id"], unique=True)
    op.create_index("ix_stored_photos_kind", "stored_photos", ["kind"])
    op.create_index("ix_stored_photos_visit_id", "stored_photos", ["visit_id"])
    op.create_index("ix_stored_photos_model_version", "stored_photos", ["model_version"])
    op.create_index("ix_stored_photos_created", "stored_photos", ["created"])
    op.create_table(
        "reviews",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("photo_id", sa.Integer(), sa.ForeignKey("stored_photos.id", ondelete="CASCADE"), nullable=False),
        sa.Column("reviewer_id", sa.Integer(), sa.ForeignKey("users.id"), nullable=False),
        sa.Column("reading", sa.String(16), nullable=False),
        sa.Column("finding", sa.String(16), nullable=False),
        sa.Column("created", sa.DateTime(), nullable=False),
    )
    op.create_index("ix_reviews_photo_id", "reviews", ["photo_id"])
    op.create_index("ix_reviews_reviewer_id", "reviews", ["reviewer_id"])


def downgrade() -> None:
    op.drop_table("reviews")
    op.drop_table("stored_photos")
    op.drop_table("visits")

"""Index hook_runs.outcome: every registrar start looks up the runs still marked running, and
a registry keeps up to max_hook_runs (50,000 by default) of them.
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_hook_runs_outcome", "hook_runs", ["outcome"])


def downgrade() -> None:
    op.drop_index("ix_hook_runs_outcome", table_name="hook_runs")

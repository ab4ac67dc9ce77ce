"""The baseline: the registry exactly as eucareg 0.1.0 made it (migrations/v010.py).

A database from 0.1.0 has these tables and no alembic_version; it is stamped with this
revision rather than migrated (eucareg/store/upgrade.py).
"""

from __future__ import annotations

from alembic import op
from sqlalchemy.schema import CreateIndex, CreateTable, DropTable

from eucareg.store.migrations import v010

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    # DDL statements rather than create_all(): the same in offline (SQL script) mode.
    for table in v010.metadata.sorted_tables:
        op.execute(CreateTable(table))
        for index in sorted(table.indexes, key=lambda i: str(i.name)):
            op.execute(CreateIndex(index))


def downgrade() -> None:
    for table in reversed(v010.metadata.sorted_tables):
        op.execute(DropTable(table))

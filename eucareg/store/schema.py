"""The registry's tables as this version of eucareg uses them (the head of the migrations).

A change here is also a new revision in migrations/versions/ that makes it; a unit test
(tests/unit/test_migrations.py) checks that the migrations arrive at exactly these tables.
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

components = sa.Table(
    "components",
    metadata,
    sa.Column("component_id", sa.String(64), primary_key=True),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("cluster", sa.String(64)),
    sa.Column("address", sa.String(64), nullable=False),
    sa.Column("fingerprint", sa.String(80), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("waiting_for", sa.String(128)),
    sa.Column("instance", sa.String(255), nullable=False, default=""),
    sa.Column("first_seen", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("registered_at", sa.Float),
    sa.Column("expires_at", sa.Float),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("next_retry_at", sa.Float),
    sa.Column("credentials_issued_at", sa.Float),
    sa.Column("credentials_collected_at", sa.Float),
    sa.Column("approved", sa.Boolean, nullable=False, default=False),
    sa.Column("admitted_by", sa.String(64), nullable=False, default=""),
    sa.Column("replaces", sa.String(64)),
    sa.Column("claimable", sa.Boolean, nullable=False, default=False, server_default="0"),
)

settings = sa.Table(
    "settings",
    metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),  # JSON
)

tokens = sa.Table(
    "tokens",
    metadata,
    sa.Column("token_id", sa.String(16), primary_key=True),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("cluster", sa.String(64)),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
    sa.Column("uses", sa.Integer),
    sa.Column("revoked_at", sa.Float),
    sa.Column("ca_fingerprint", sa.String(80), nullable=False),
)

token_uses = sa.Table(
    "token_uses",
    metadata,
    sa.Column("token_id", sa.String(16), primary_key=True),
    sa.Column("component_id", sa.String(64), primary_key=True),
    sa.Column("at", sa.Float, nullable=False),
    # Set when the component was deregistered: the token no longer admits it.
    sa.Column("spent", sa.Boolean, nullable=False, default=False),
)

revocations = sa.Table(
    "revocations",
    metadata,
    sa.Column("serial", sa.String(64), primary_key=True),
    sa.Column("component_id", sa.String(64), nullable=False),
    sa.Column("fingerprint", sa.String(80), nullable=False),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
)

certificates = sa.Table(
    "certificates",
    metadata,
    sa.Column("component_id", sa.String(64), primary_key=True),
    sa.Column("fingerprint", sa.String(80), nullable=False),
    sa.Column("serial", sa.String(64), nullable=False),
    sa.Column("cert_pem", sa.Text, nullable=False),
    sa.Column("issued_at", sa.Float, nullable=False),
)

events = sa.Table(
    "events",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", sa.Float, nullable=False, index=True),
    sa.Column("component_id", sa.String(64), nullable=False, index=True),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("cluster", sa.String(64)),
    sa.Column("address", sa.String(64), nullable=False),
    sa.Column("kind", sa.String(32), nullable=False, index=True),
    sa.Column("code", sa.String(64), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    # How the announcement behind it was heard (core.model.HEARD_VIA); "" when none was.
    sa.Column("via", sa.String(16), nullable=False, server_default=""),
)

hook_runs = sa.Table(
    "hook_runs",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("component_id", sa.String(64), nullable=False, index=True),
    sa.Column("hook", sa.String(255), nullable=False),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("duration", sa.Float, nullable=False),
    # Indexed (revision 0002): every start looks up the runs still marked running.
    sa.Column("outcome", sa.String(16), nullable=False, index=True),
    sa.Column("exit_code", sa.Integer),
    sa.Column("stdout", sa.Text, nullable=False),
    sa.Column("stderr", sa.Text, nullable=False),
    sa.Column("run_id", sa.String(40), index=True, unique=True),
    sa.Column("attempt", sa.Integer, nullable=False, default=1, server_default="1"),
    sa.Column("rerun", sa.Boolean, nullable=False, default=False, server_default="0"),
    sa.Column("pgid", sa.Integer),
    sa.Column("proc_start", sa.BigInteger),
    sa.Column("batch", sa.String(40)),
)

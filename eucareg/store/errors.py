"""The store's errors that callers outside the registrar catch: a module without SQLAlchemy, so
that importing them (`eucareg agent` does, on every host) does not load it.
"""

from __future__ import annotations


class StoreBusy(Exception):
    """Another registrar already owns this database; the message says which process."""


class SchemaTooNew(Exception):
    """The registry carries a schema revision this eucareg does not know: a newer one wrote
    it. Nothing was changed; the message names both revisions."""

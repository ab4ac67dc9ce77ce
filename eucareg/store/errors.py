"""The store's errors that callers outside the registrar catch: a module without SQLAlchemy, so
that importing them (`eucareg agent` does, on every host) does not load it.
"""

from __future__ import annotations


class StoreBusy(Exception):
    """Another registrar already owns this database; the message says which process."""

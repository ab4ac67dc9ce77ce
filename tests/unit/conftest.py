"""Fixtures shared by unit tests: a CLC served on loopback to talk to, and (for the CLI
tests, which ask for it) no host configuration leaking in."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from eucareg.cli import client
from eucareg.pki import keypairs, signatures
from tests.unit.test_api_harness import CLC_SETTINGS, Harness, served


@pytest.fixture
def no_host_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever this machine has in /etc/eucareg must not change the tests."""
    monkeypatch.setattr(client, "DEFAULT_CONFIG", tmp_path / "absent.toml")


@pytest.fixture
async def clc(tmp_path: Path) -> AsyncIterator[Harness]:
    async with served(tmp_path / "clc", CLC_SETTINGS) as harness:
        yield harness


@pytest.fixture
def verifies(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Count the signature checks the registrar makes (one element per call)."""
    calls: list[int] = []
    real = signatures.verify

    def counting(public_key: keypairs.PublicKey, body: bytes, signature: str) -> bool:
        calls.append(1)
        return real(public_key, body, signature)

    monkeypatch.setattr(signatures, "verify", counting)
    yield calls

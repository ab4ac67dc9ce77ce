"""Replacing the cloud CA key (`eucareg ca rotate`, with the CLC's agent stopped): a new key and
CA certificate and a handover signed by the old key, staged in full and committed by one rename,
then applied in idempotent steps, so a crash at any point is finished by the next start.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from eucareg.config.file import SOCKET_FILE
from eucareg.core.model import Role
from eucareg.pki import certificates, handover, keypairs
from eucareg.pki import credentials as cred
from eucareg.pki.cloud import read_held

DAY = 86400.0
DEFAULT_OVERLAP = 30 * DAY
MIN_OVERLAP = 600.0  # components must have a chance to move (their watch is 4 minutes)
MAX_OVERLAP = handover.MAX_OVERLAP  # a longer cross-certificate is refused by components
STAGE = "rotation"  # under state_dir/identity: the staged rotation, present until applied
RETIRED = "retired"  # under state_dir/identity: old CA keys, kept for the record
NEW_KEY, MANIFEST = "new.key.pem", "rotation.json"


class RotationError(keypairs.CredentialError):
    """The rotation cannot be done, or a staged one cannot be finished."""


@dataclass(frozen=True)
class Rotated:
    old_fingerprint: str
    new_fingerprint: str
    overlap_ends: float
    retired_key: Path


def identity_dir(state_dir: Path) -> Path:
    return state_dir / "identity"


def agent_running(state_dir: Path) -> bool:
    """Whether an agent answers on this host's operator socket."""
    path = state_dir / SOCKET_FILE
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2.0)
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def rotate(state_dir: Path, key_dir: Path, overlap: float, now: float) -> Rotated:
    """Replace the CLC's key (the cloud CA key) by a new one (blocking). The agent must be
    stopped: its key is in every registrar structure it runs."""
    if not MIN_OVERLAP <= overlap <= MAX_OVERLAP:
        raise RotationError(
            f"--overlap must be between {MIN_OVERLAP:g} s and {MAX_OVERLAP / DAY:g} days, "
            f"got {overlap:g} s"
        )
    finish_pending(state_dir)  # an interrupted rotation first: this one starts from its end

    key_path = identity_dir(state_dir) / f"{Role.CLC.value}.key.pem"
    old_key = keypairs.load_key(key_path)
    old = read_held(key_dir, old_key)
    held = handover.load_held(key_dir / handover.HANDOVER, old, now)
    if held is not None:
        raise RotationError(
            f"the previous rotation's overlap lasts until {_iso(held.ends)} (from CA "
            f"{held.old_fingerprint}): rotating again now would strand every component that "
            "has not moved yet; rotate again after it ends"
        )
    new_key = keypairs.generate_key()
    new = handover.successor(new_key, old, now)
    cross = handover.make_cross(old_key, old, new, now, overlap)
    passed = handover.Handover(cross=cross, old=old)
    _stage(state_dir, key_dir, new_key, new, passed)
    retired = apply_pending(state_dir)
    assert retired is not None
    return Rotated(
        keypairs.fingerprint(old_key.public_key()),
        certificates.cert_fingerprint(new),
        passed.ends,
        retired,
    )


def _stage(
    state_dir: Path,
    key_dir: Path,
    new_key: keypairs.PrivateKey,
    new: x509.Certificate,
    passed: handover.Handover,
) -> None:
    """Write everything the rotation needs into a fresh directory, then rename it into place:
    the commit point (before it, nothing changed; after it, the rotation gets finished)."""
    ident = identity_dir(state_dir)
    tmp = ident / f"{STAGE}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(mode=0o700)
    cred.write_atomic(tmp / NEW_KEY, keypairs.key_pem(new_key))
    cred.write_atomic(tmp / cred.CLOUD_CERT, certificates.cert_pem(new).encode())
    cred.write_atomic(tmp / handover.HANDOVER, passed.pem().encode())
    manifest = {"key_dir": str(key_dir.resolve()), "old": passed.old_fingerprint}
    cred.write_atomic(tmp / MANIFEST, json.dumps(manifest).encode())
    os.rename(tmp, ident / STAGE)
    _fsync_dir(ident)


def finish_pending(state_dir: Path) -> Path | None:
    """Finish a rotation interrupted after its commit, and drop one interrupted before it;
    the retired key's path if one was finished (blocking; the agent calls it at start)."""
    ident = identity_dir(state_dir)
    shutil.rmtree(ident / f"{STAGE}.tmp", ignore_errors=True)
    if not (ident / STAGE).is_dir():
        return None
    return apply_pending(state_dir)


def apply_pending(state_dir: Path) -> Path | None:
    """Apply the staged rotation; each step is safe to repeat. The old key is retired first
    and the new certificate written last: between, the agent would not start (its key and
    cloud-cert.pem disagree), and the next start finishes the rotation from the stage."""
    ident = identity_dir(state_dir)
    stage = ident / STAGE
    try:
        manifest = json.loads((stage / MANIFEST).read_text())
        key_dir = Path(manifest["key_dir"])
        old_fp = str(manifest["old"])
        new_key = keypairs.load_key(stage / NEW_KEY)
        new_pem = (stage / cred.CLOUD_CERT).read_bytes()
        passed = (stage / handover.HANDOVER).read_bytes()
    except (OSError, ValueError, KeyError, TypeError, keypairs.CredentialError) as exc:
        raise RotationError(
            f"{stage} holds an unusable staged rotation ({exc}): move it aside and check "
            "that state_dir/identity/clc.key.pem and key_dir/cloud-cert.pem belong together"
        ) from exc
    key_path = ident / f"{Role.CLC.value}.key.pem"
    retired = ident / RETIRED / f"clc-{old_fp.removeprefix('sha256:')[:16]}.key.pem"
    current = keypairs.load_key(key_path)
    held_fp = keypairs.fingerprint(current.public_key())
    if held_fp not in (old_fp, keypairs.fingerprint(new_key.public_key())):
        # Neither the key this stage retires nor the one it brings (a backup restored over a
        # rotation cut short, say): overwriting it would lose a key nothing has retired.
        raise RotationError(
            f"{stage} rotates from CA {old_fp}, but {key_path} holds {held_fp}: move the "
            "stage aside and check that the key and key_dir/cloud-cert.pem belong together"
        )
    if held_fp == old_fp:
        retired.parent.mkdir(mode=0o700, exist_ok=True)
        cred.write_atomic(retired, keypairs.key_pem(current))
    cred.write_atomic(key_dir / handover.HANDOVER, passed)
    cred.write_atomic(key_path, keypairs.key_pem(new_key))
    cred.write_atomic(key_dir / cred.LAYOUTS[Role.CLC].key, keypairs.key_pem(new_key))
    cred.write_atomic(key_dir / cred.CLOUD_CERT, new_pem)
    shutil.rmtree(stage)
    _fsync_dir(ident)
    return retired


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(seconds))

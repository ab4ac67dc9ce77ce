"""Who the fleet's simulated NCs are: their ids (`nc-<prefix>000000`…), their RSA keys, made once
and cached, and their addresses, one each from a first address on."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from eucareg.agent.identity import Identity
from eucareg.pki import credentials as cred
from eucareg.pki import keypairs


def node_id(prefix: str, index: int) -> str:
    return f"nc-{prefix}{index:06d}"


def fleet_identities(cache: Path, count: int, prefix: str = "fleet") -> list[Identity]:
    """Ids `nc-<prefix>000000`…, with keys cached in `cache` (generation is ~35 ms each)."""
    cache.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(count):
        key = _cached_key(cache / f"{prefix}{i:06d}.pem")
        out.append(Identity(node_id(prefix, i), key, keypairs.fingerprint(key.public_key())))
    return out


def _cached_key(path: Path) -> keypairs.PrivateKey:
    """A key this lab made and cached, loaded without RSA's full validation: that takes
    ~29 ms a key, a minute for a fleet of 2,000, and these keys are our own."""
    if not path.exists():
        return cred.load_or_create_key(path)
    key = serialization.load_pem_private_key(
        path.read_bytes(), password=None, unsafe_skip_rsa_key_validation=True
    )
    if not isinstance(key, rsa.RSAPrivateKey):
        raise keypairs.CredentialError(f"{path} is not an RSA private key")
    return key


def fleet_addresses(first: str, count: int) -> list[str]:
    base = ipaddress.ip_address(first)
    return [str(base + i) for i in range(count)]

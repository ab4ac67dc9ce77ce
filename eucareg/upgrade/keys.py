"""The key directory of a Eucalyptus 1.6.2 front end, /var/lib/eucalyptus/keys/: which
clusters hold credentials, and whether each set is whole and consistent (certificate subjects
O=cc-<cluster> and O=nc-<cluster>, each private key the one of its certificate). Read only:
nothing here copies, keeps or sends a Eucalyptus private key; they are compared and dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from eucareg.core import grammar
from eucareg.upgrade.sources import Problem, read_regular

KEYS = "var/lib/eucalyptus/keys"
CLOUD_FILES = ("cloud-cert.pem", "cloud-pk.pem", "euca.p12")
# Per cluster: certificate, its key, and the subject organisation's prefix.
PAIRS = (("cluster-cert.pem", "cluster-pk.pem", "cc-"), ("node-cert.pem", "node-pk.pem", "nc-"))
CLUSTER_FILES = ("cluster-cert.pem", "cluster-pk.pem", "node-cert.pem", "node-pk.pem", "vtunpass")
MAX_KEY_FILE = 256 * 1024


@dataclass(frozen=True)
class ClusterKeys:
    cluster: str
    directory: str
    complete: bool  # every file there, every subject and key as it should be


@dataclass(frozen=True)
class KeyDir:
    path: str
    exists: bool
    cloud: bool  # cloud-cert.pem is there: this is (or was) the CLC's key directory
    clusters: tuple[ClusterKeys, ...]
    problems: tuple[Problem, ...]

    @property
    def names(self) -> frozenset[str]:
        return frozenset(c.cluster for c in self.clusters)


def read_keys(root: Path) -> KeyDir:
    """The CLC's layout (keys/<cluster>/…) and a CC host's (the cluster's files in keys/
    itself, the cluster named by the O=cc-<cluster> subject) are both read."""
    base = root / KEYS
    if not base.is_dir():
        return KeyDir(str(base), False, False, (), ())
    problems: list[Problem] = []
    cloud = (base / "cloud-cert.pem").exists()
    if cloud:
        problems += [
            Problem(str(base / name), "missing (the CLC's credentials are incomplete)")
            for name in CLOUD_FILES
            if not (base / name).exists()
        ]
    clusters: list[ClusterKeys] = []
    if (base / "cluster-cert.pem").exists():
        name = _subject_cluster(base, base / "cluster-cert.pem", "cc-", problems)
        if name is not None:
            clusters.append(_cluster(base, base, name, problems))
    try:
        subdirs = sorted(p for p in base.iterdir() if p.is_dir())
    except OSError as exc:  # a cross-check only: said, and the import goes on
        problems.append(Problem(str(base), f"cannot be listed: {exc.strerror or exc}"))
        subdirs = []
    for sub in subdirs:
        if not any((sub / f).exists() for f in CLUSTER_FILES):
            continue  # not a cluster's key directory
        if not grammar.CLUSTER.fullmatch(sub.name):
            problems.append(Problem(str(sub), "not a cluster name eucareg can register"))
            continue
        clusters.append(_cluster(base, sub, sub.name, problems))
    return KeyDir(str(base), True, cloud, tuple(clusters), tuple(problems))


def _cluster(base: Path, directory: Path, cluster: str, problems: list[Problem]) -> ClusterKeys:
    before = len(problems)
    for name in CLUSTER_FILES:
        if not (directory / name).exists():
            problems.append(Problem(str(directory / name), f"missing (cluster {cluster})"))
    for cert_name, key_name, prefix in PAIRS:
        cert_path, key_path = directory / cert_name, directory / key_name
        if not cert_path.exists():
            continue
        cert = _certificate(base, cert_path, problems)
        if cert is None:
            continue
        organisation = _organisation(cert)
        if organisation != prefix + cluster:
            problems.append(
                Problem(
                    str(cert_path),
                    f"subject O={organisation or '(none)'}, expected O={prefix}{cluster}",
                )
            )
        if key_path.exists():
            _key_matches(base, key_path, cert, problems)
    return ClusterKeys(cluster, str(directory), complete=len(problems) == before)


def _read(base: Path, path: Path, problems: list[Problem]) -> bytes | None:
    """A key or certificate file's bytes, or None (the problem said). Only a plain file inside
    the key directory is read: this runs as root, and a link planted there must not make it
    read (or wait on) whatever it names."""
    try:
        target, home = path.resolve(strict=True), base.resolve(strict=True)
    except OSError as exc:
        problems.append(Problem(str(path), f"cannot be read: {exc.strerror or exc}"))
        return None
    if home not in target.parents:
        problems.append(
            Problem(str(path), f"leads outside the key directory (to {target}); not read")
        )
        return None
    try:
        data = read_regular(path, MAX_KEY_FILE)
    except PermissionError:
        problems.append(Problem(str(path), "cannot be read here (run as root to check it)"))
        return None
    except OSError as exc:
        problems.append(Problem(str(path), f"cannot be read: {exc.strerror or exc}"))
        return None
    except ValueError as exc:
        problems.append(Problem(str(path), str(exc)))
        return None
    if len(data) > MAX_KEY_FILE:
        problems.append(Problem(str(path), "too large to be a key or certificate"))
        return None
    return data


def _certificate(base: Path, path: Path, problems: list[Problem]) -> x509.Certificate | None:
    data = _read(base, path, problems)
    if data is None:
        return None
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        problems.append(Problem(str(path), "not a PEM certificate"))
        return None


def _organisation(cert: x509.Certificate) -> str | None:
    values = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    return str(values[0].value) if values else None


def _subject_cluster(base: Path, path: Path, prefix: str, problems: list[Problem]) -> str | None:
    cert = _certificate(base, path, problems)
    if cert is None:
        return None
    organisation = _organisation(cert) or ""
    name = organisation.removeprefix(prefix)
    if not organisation.startswith(prefix) or not grammar.CLUSTER.fullmatch(name):
        problems.append(
            Problem(
                str(path),
                f"subject O={organisation or '(none)'} names no "
                f"cluster (expected O={prefix}<cluster>)",
            )
        )
        return None
    return name


def _key_matches(base: Path, path: Path, cert: x509.Certificate, problems: list[Problem]) -> None:
    """Whether the private key is the certificate's; the key object is dropped at once."""
    data = _read(base, path, problems)
    if data is None:
        return
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        problems.append(Problem(str(path), "not an unencrypted PEM private key"))
        return
    except Exception as exc:  # cryptography raises its own kinds for unsupported keys
        problems.append(Problem(str(path), f"cannot be loaded: {type(exc).__name__}"))
        return
    mine = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    theirs = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if mine != theirs:
        problems.append(Problem(str(path), "is not the private key of its certificate"))

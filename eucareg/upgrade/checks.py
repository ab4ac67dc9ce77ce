"""Cross-checks of a 1.6.2 front end's sources: the `euca_conf --list-*` output is the truth
to import, and where eucalyptus.conf (NODES), nodes.list, eucalyptus-ipaddr.conf or the key
directory say otherwise, the operator is told what differs and which one was followed.
"""

from __future__ import annotations

from eucareg.core.model import Role
from eucareg.upgrade.keys import KeyDir
from eucareg.upgrade.sources import IPADDR_KEYS, Conf, Listing, Problem

TRUTH = "the listing is the truth"


def cross_check(
    listing: Listing, conf: Conf, keys: KeyDir, local_cluster: str | None
) -> list[Problem]:
    """What the other sources say that the listing does not, as warnings (never fatal).
    `local_cluster` is the cluster of the CC on this host, if any: NODES lists its nodes."""
    out: list[Problem] = []
    if not conf.conf.exists:
        out.append(
            Problem(
                conf.conf.path,
                "not found: not a Eucalyptus 1.6.2 host? The listing is imported all the same",
            )
        )
    out += _nodes(listing, conf, local_cluster)
    out += _ipaddr(listing, conf)
    out += _keys(listing, keys)
    return out


def _nodes(listing: Listing, conf: Conf, local: str | None) -> list[Problem]:
    listed = {c.address: c.cluster for c in listing.components if c.role is Role.NC}
    out = [
        Problem(
            conf.nodes_from,
            f"names node {node}, which euca_conf --list-nodes does not "
            f"list: not imported ({TRUTH})",
        )
        for node in conf.nodes
        if node not in listed
    ]
    if local is not None and conf.nodes_from:
        out += [
            Problem(
                conf.nodes_from,
                f"does not name node {address} of cluster {local}, which "
                f"euca_conf --list-nodes lists: imported ({TRUTH})",
            )
            for address, cluster in listed.items()
            if cluster == local and address not in conf.nodes
        ]
    return out


def _ipaddr(listing: Listing, conf: Conf) -> list[Problem]:
    out = []
    for key, role in IPADDR_KEYS.items():
        value = conf.ipaddr.values.get(key, "").strip()
        if not value or "$" in value:
            continue
        addresses = sorted({c.address for c in listing.components if c.role is role})
        if value not in addresses:
            shown = ", ".join(addresses) or "none"
            out.append(
                Problem(
                    conf.ipaddr.path,
                    f"{key}={value}, but euca_conf lists the {role.value} at {shown} ({TRUTH})",
                )
            )
    return out


def _keys(listing: Listing, keys: KeyDir) -> list[Problem]:
    if not keys.exists:
        return [
            Problem(keys.path, "no key directory here: the clusters' credentials are not checked")
        ]
    out = list(keys.problems)
    clusters = {c.cluster for c in listing.components if c.role is Role.CC and c.cluster}
    if keys.cloud:
        out += [
            Problem(
                keys.path,
                f"cluster {name} is listed, but holds no keys here "
                f"({keys.path}/{name}/): imported ({TRUTH})",
            )
            for name in sorted(clusters - keys.names)
        ]
    out += [
        Problem(
            keys.path,
            f"holds the credentials of cluster {name}, which euca_conf "
            f"--list-clusters does not list: not imported ({TRUTH})",
        )
        for name in sorted(keys.names - clusters)
    ]
    return out

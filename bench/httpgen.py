"""A cheap load generator for the registrar's signed HTTP endpoints, run inside a lab namespace
(`python -m bench.httpgen announce|collect …`) by bench/fallback.py.

`announce`: N NCs announce themselves over the signed HTTP fallback (POST /v1/announce), each
from its own address (the registrar refuses an addr= the request does not come from), over
HTTPS with the cluster's certificate checked in the handshake exactly as an agent checks it
(eucareg.pki.tls.client_context, pinned to the cloud CA). `collect`: the same NCs, once
registered, collect their first credentials (POST /v1/credentials?wait=0); one counts only
when its bundle verified against its own key, names it, and chains to the pinned CA.

What a real fleet would pay and the figure must not measure is done before the timed part:
keys are loaded without re-validation (they are ours, made by the benchmark), and every
request is signed in advance (RSA-2048, ~0.7 ms each); the TLS context is shared. Each request
is its own TLS connection with a full handshake, as each NC's would be. At most `concurrency`
requests are open at once. A 429/503 answer, or a failed connection, is asked again with a
fresh signature (counted in `retries`). The generator reports its own CPU (os.times) for the
signing and for the timed part, so that it can be compared with the registrar's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from bench.procstat import self_cpu_s
from eucareg.core import txt
from eucareg.core.model import AnnouncedState, Role
from eucareg.pki import certificates, keypairs, names, tls
from eucareg.pki import credentials as cred
from eucareg.pki.signing import signed_body, socket_audience

API_PORT = 8780
REQUEST_TIMEOUT = 60.0
MAX_ATTEMPTS = 20
RETRY_DELAY = 0.2


@dataclass(frozen=True)
class Node:
    component_id: str
    key: rsa.RSAPrivateKey
    fingerprint: str
    address: str


@dataclass
class Result:
    component_id: str
    sent_at: float = 0.0
    done_at: float | None = None
    http: int = 0
    status: str = ""  # the registrar's "status" (announce) or "verified" (collect)
    attempts: int = 0
    error: str = ""


def key_path(cache: Path, prefix: str, index: int) -> Path:
    return cache / f"{prefix}{index:06d}.pem"  # the layout of eucalab.fleet_nodes.fleet_identities


def load_nodes(cache: Path, prefix: str, count: int, first_address: str) -> list[Node]:
    """The fleet's ids and keys (ids nc-<prefix>000000…; keys made once and cached, loaded
    without the full RSA validation, 29 ms each here, since we wrote them ourselves)."""
    base = ipaddress.ip_address(first_address)
    nodes = []
    for i in range(count):
        path = key_path(cache, prefix, i)
        if not path.exists():
            cred.load_or_create_key(path)
        key = serialization.load_pem_private_key(
            path.read_bytes(), None, unsafe_skip_rsa_key_validation=True
        )
        assert isinstance(key, rsa.RSAPrivateKey)
        fp = keypairs.fingerprint(key.public_key())
        nodes.append(Node(f"nc-{prefix}{i:06d}", key, fp, str(base + i)))
    return nodes


def _request(node: Node, args: argparse.Namespace) -> bytes:
    """The whole HTTP/1.1 request, signed now for this registrar."""
    audience = socket_audience(args.registrar, API_PORT)
    if args.command == "announce":
        path = "/v1/announce"
        record = txt.encode(
            role=Role.NC,
            component_id=node.component_id,
            cluster=args.cluster,
            state=AnnouncedState.READY,
            address=ipaddress.ip_address(node.address),
            fingerprint=node.fingerprint,
            api_port=None,
            eucavers="3.4",
        )
        fields: dict[str, Any] = {"txt": record}
    else:
        path = "/v1/credentials?wait=0"
        fields = {"component_id": node.component_id}
    body, headers = signed_body(node.key, fields, method="POST", path=path, audience=audience)
    head = [f"POST {path} HTTP/1.1", f"Host: {audience}", "Connection: close"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    head.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def _exchange(
    node: Node, request: bytes, args: argparse.Namespace, ctx: Any
) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection(
        args.registrar,
        API_PORT,
        ssl=ctx,
        server_hostname=tls.SERVER_NAMES[Role.CC],
        local_addr=(node.address, 0),
    )
    try:
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        code = int(head.split(b" ", 2)[1])
        length = None
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        body = await (reader.readexactly(length) if length is not None else reader.read())
        return code, body
    finally:
        writer.close()
        with contextlib.suppress(OSError, TimeoutError, asyncio.IncompleteReadError):
            await asyncio.wait_for(writer.wait_closed(), 2)


def _verified(node: Node, data: dict[str, Any], args: argparse.Namespace) -> str:
    """'verified', or why the bundle is refused (as an agent would refuse it)."""
    files = data.get("files")
    if not isinstance(files, dict):
        return "no bundle"
    try:
        named = names.CertIdentity(Role.NC, args.cluster, node.component_id)
        verified = cred.verify_bundle(files, Role.NC, node.key, expect=named)
        ca = certificates.cert_fingerprint(certificates.load_cert_pem(verified[cred.CLOUD_CERT]))
    except (keypairs.CredentialError, ValueError) as exc:
        return f"bundle refused: {exc}"
    return "verified" if ca == args.pin else f"bundle of CA {ca}, not the pinned one"


async def _one(
    node: Node,
    request: bytes,
    args: argparse.Namespace,
    ctx: Any,
    gate: asyncio.Semaphore,
    result: Result,
) -> None:
    async with gate:
        result.sent_at = time.time()
        while result.attempts < MAX_ATTEMPTS:
            result.attempts += 1
            try:
                code, raw = await asyncio.wait_for(
                    _exchange(node, request, args, ctx), REQUEST_TIMEOUT
                )
                data = json.loads(raw)
            except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError) as exc:
                result.error = str(exc) or type(exc).__name__
                code, data = 0, {}
            result.http = code
            if code == 200:
                result.error = ""
            if code == 200 and args.command == "announce":
                result.status = str(data.get("status"))
            elif code == 200:
                result.status = _verified(node, data, args)
            elif code in (0, 202, 429, 503):  # ask again, signed afresh
                result.status = str(data.get("status") or data.get("code") or "")
                await asyncio.sleep(RETRY_DELAY)
                request = _request(node, args)
                continue
            else:
                result.status = str(data.get("code") or data.get("status") or "")
                result.error = str(data.get("error") or data.get("reason") or data)[:300]
            break
        result.done_at = time.time()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    cpu_start = self_cpu_s()
    nodes = load_nodes(Path(args.cache), args.id_prefix, args.count, args.first_address)
    cpu_loaded = self_cpu_s()
    requests = [_request(node, args) for node in nodes]  # signed before the timed part
    ctx = tls.client_context(tls.Expect(Role.CC, args.cluster, pin=args.pin))
    cpu_signed = self_cpu_s()
    results = [Result(node.component_id) for node in nodes]
    gate = asyncio.Semaphore(args.concurrency)
    started = time.time()
    await asyncio.wait_for(
        asyncio.gather(
            *(
                _one(node, req, args, ctx, gate, res)
                for node, req, res in zip(nodes, requests, results, strict=True)
            )
        ),
        args.timeout,
    )
    finished = time.time()
    cpu_end = self_cpu_s()
    return {
        "command": args.command,
        "count": args.count,
        "concurrency": args.concurrency,
        "started_at": started,
        "finished_at": finished,
        "generator_cpu": {
            "load_keys_s": round(cpu_loaded - cpu_start, 4),
            "presign_s": round(cpu_signed - cpu_loaded, 4),
            "timed_s": round(cpu_end - cpu_signed, 4),
            "process_total_s": round(cpu_end, 4),
            "max_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        },
        "results": [asdict(r) for r in results],
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.httpgen", description=__doc__)
    p.add_argument("command", choices=("announce", "collect"))
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--id-prefix", default="fleet")
    p.add_argument("--cache", required=True, help="the fleet's key cache")
    p.add_argument("--first-address", required=True)
    p.add_argument("--registrar", required=True, help="the CC's address")
    p.add_argument("--pin", required=True, help="the cloud CA's fingerprint")
    p.add_argument("--cluster", default="cluster1")
    p.add_argument("--concurrency", type=int, default=100)
    p.add_argument("--timeout", type=float, default=300.0)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    json.dump(asyncio.run(run(args)), sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()

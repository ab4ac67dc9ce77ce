"""A rogue registrar for the lab: announces itself over mDNS as the CLC and as the registered CC
of a victim's cluster, and answers every request on its API port in one hostile way. Runs
inside a lab host's namespace until SIGTERM; never used by eucareg itself.

Modes: `gone` answers 410 to everything (to make components drop credentials), `bundle`
hands out credentials from its own CA, `garbage` answers bytes that are neither TLS nor HTTP.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import ssl
import tempfile
from pathlib import Path
from typing import Any

from aiohttp import web

from eucalab.publisher import until_terminated
from eucareg.config.file import DEFAULT_API_PORT
from eucareg.core import txt
from eucareg.core.model import AnnouncedState, Role
from eucareg.mdns.types import ServiceSpec
from eucareg.mdns.zeroconf_backend import ZeroconfBackend
from eucareg.pki import certificates, keypairs, tls
from eucareg.pki import credentials as cred

# Each mode its own ids, so that several rogues can announce at once.
TAGS = {"gone": "a", "bundle": "b", "garbage": "c"}


class Rogue:
    """Its own cloud CA (which names the rogue CLC) and a CC certificate it signed."""

    def __init__(self, cluster: str, mode: str) -> None:
        self.cluster = cluster
        self.clc_id, self.cc_id = f"clc-0000000bad{TAGS[mode]}1", f"cc-0000000bad{TAGS[mode]}2"
        self.key = keypairs.generate_key()
        self.root = certificates.create_cloud_ca(self.key, self.clc_id)
        self.cc = certificates.issue_certificate(
            issuer_key=self.key,
            issuer_cert=self.root,
            subject_key=self.key.public_key(),
            role=Role.CC,
            component_id=self.cc_id,
            cluster=cluster,
        )
        self.answered = 0

    def bundle(self, body: dict[str, Any]) -> dict[str, str]:
        """Credentials from our CA for whatever key signed the request, as every role has them."""
        subject = keypairs.load_public_pem(str(body.get("public_key", "")))
        cid = str(body.get("component_id", "nc-00000000beef"))
        role = Role(cid.split("-", 1)[0]) if cid.split("-", 1)[0] in set(Role) else Role.NC
        own = certificates.issue_certificate(
            issuer_key=self.key,
            issuer_cert=self.cc if role is Role.NC else self.root,
            subject_key=subject,
            role=role,
            component_id=cid,
            cluster=self.cluster if role in (Role.CC, Role.SC, Role.NC) else None,
        )
        files = {
            cred.CLOUD_CERT: certificates.cert_pem(self.root),
            cred.LAYOUTS[role].cert: certificates.cert_pem(own),
        }
        if role is Role.NC:
            files[cred.LAYOUTS[Role.NC].issuer or ""] = certificates.cert_pem(self.cc)
        return files


async def serve(rogue: Rogue, mode: str, port: int, workdir: Path) -> Any:
    if mode == "garbage":

        async def junk(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            rogue.answered += 1
            writer.write(b"HTTP/1.0 410 Gone\r\n\r\n" + b"\x00\xff garbage " * 64)
            await writer.drain()
            writer.close()

        return await asyncio.start_server(junk, host=None, port=port)

    async def answer(request: web.Request) -> web.Response:
        rogue.answered += 1
        print(f"rogue answered {request.method} {request.path}", flush=True)
        if mode == "gone":
            return web.json_response({"status": "revoked", "error": "revoked"}, status=410)
        try:
            body = json.loads(await request.read())
            files = rogue.bundle(body)
        except Exception as exc:  # whatever it was, a rogue answers something
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response({"status": "registered", "files": files})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    # As a real registrar does: the CC's certificate to NCs, the CLC's to everyone else.
    tls.write_chain(workdir / "cc.pem", [rogue.cc, rogue.root])
    tls.write_chain(workdir / "clc.pem", [rogue.root])
    cred.write_atomic(workdir / "key.pem", keypairs.key_pem(rogue.key))
    as_cc = tls.server_context(workdir / "cc.pem", workdir / "key.pem")
    as_clc = tls.server_context(workdir / "clc.pem", workdir / "key.pem")

    def choose(sslobj: ssl.SSLObject, name: str | None, _: ssl.SSLContext) -> None:
        if name == tls.SERVER_NAMES[Role.CLC]:
            sslobj.context = as_clc

    as_cc.sni_callback = choose
    await web.TCPSite(runner, host=None, port=port, ssl_context=as_cc).start()
    return runner


def specs(rogue: Rogue, address: str, port: int) -> list[ServiceSpec]:
    fp = certificates.cert_fingerprint(rogue.root)
    addr = ipaddress.ip_address(address)
    out = []
    ids = ((Role.CLC, rogue.clc_id, None), (Role.CC, rogue.cc_id, rogue.cluster))
    for role, cid, cluster in ids:
        record = txt.encode(
            role=role,
            component_id=cid,
            cluster=cluster,
            state=AnnouncedState.REGISTERED,
            address=addr,
            fingerprint=fp,
            api_port=port,
            eucavers="3.4",
        )
        out.append(ServiceSpec(f"{role.txt_type}-{cid}", port, record, (address,), "rogue.local."))
    return out


async def main(args: argparse.Namespace) -> None:
    rogue = Rogue(args.cluster, args.mode)
    with tempfile.TemporaryDirectory() as work:
        server = await serve(rogue, args.mode, args.port, Path(work))
        backend = ZeroconfBackend()
        await backend.start()
        for spec in specs(rogue, args.address, args.port):
            await backend.publish(spec)
        print(f"rogue ({args.mode}) announced at {args.address}:{args.port}", flush=True)
        await until_terminated()
        await backend.close()
        if isinstance(server, web.AppRunner):
            await server.cleanup()
        else:
            server.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--address", required=True, help="the address to announce")
    parser.add_argument("--cluster", required=True, help="the victim's cluster")
    parser.add_argument("--mode", choices=["gone", "bundle", "garbage"], required=True)
    parser.add_argument("--port", type=int, default=DEFAULT_API_PORT)
    asyncio.run(main(parser.parse_args()))

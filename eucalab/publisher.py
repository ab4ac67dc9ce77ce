"""A stand-in publisher for the tests' rogues, spoofs and twins: one raw _eucalyptus._tcp
service announced over zeroconf until SIGTERM, run as `python -m eucalab.publisher`."""

from __future__ import annotations

import sys
from collections.abc import Mapping

from eucareg.config.file import DEFAULT_API_PORT

__all__ = ["publisher_argv", "until_terminated"]


def publisher_argv(instance: str, txt: Mapping[str, str], addresses: list[str]) -> list[str]:
    """Command that publishes one arbitrary service until killed (spoofs, twins, strays)."""
    argv = [sys.executable, "-m", "eucalab.publisher", "publish", instance]
    argv += [f"--addr={a}" for a in addresses]
    return argv + [f"--txt={k}={v}" for k, v in txt.items()]


async def _publish(instance: str, addresses: list[str], txt: dict[str, str]) -> None:
    from eucareg.mdns.types import ServiceSpec
    from eucareg.mdns.zeroconf_backend import ZeroconfBackend

    backend = ZeroconfBackend()
    await backend.start()
    spec = ServiceSpec(
        instance=instance,
        port=DEFAULT_API_PORT,
        txt=txt,
        addresses=tuple(addresses),
        server=f"lab-{abs(hash(instance)) % 10**8}.local.",
    )
    await backend.publish(spec)
    print(f"published {instance!r}", flush=True)
    await until_terminated()
    await backend.close()


async def until_terminated() -> None:
    """Return on SIGTERM or SIGINT (the lab stops what it spawned with SIGTERM)."""
    import asyncio
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


if __name__ == "__main__":
    import argparse
    import asyncio

    parser = argparse.ArgumentParser(description="Publish one raw _eucalyptus._tcp service.")
    parser.add_argument("command", choices=["publish"])
    parser.add_argument("instance")
    parser.add_argument("--addr", action="append", default=[])
    parser.add_argument("--txt", action="append", default=[], help="KEY=VALUE")
    args = parser.parse_args()
    pairs = dict(item.split("=", 1) for item in args.txt)
    asyncio.run(_publish(args.instance, args.addr, pairs))

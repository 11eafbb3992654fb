"""Separate test hosts: network namespaces joined to the test's own by veth pairs.

Host i gets namespace ``seqr-<run>-<i>`` and a veth pair: 10.<run>.<i>.1/30 on the test's side,
10.<run>.<i>.2/30 inside. A server in the namespace listens on its own address, reaches the
database through a proxy bound to the test-side address, and dies or is cut off alone - as on
a machine of its own. Needs root and iproute2; ``Hosts.available()`` says whether this machine
can, and callers fall back to loopback (one network stack) when it cannot.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@dataclass(frozen=True)
class Host:
    ns: str
    gateway: str          # the test's side of the link (what the host reaches us at)
    address: str          # the host's own address

    def command(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *argv]


class Hosts:
    def __init__(self) -> None:
        self._run = secrets.randbelow(200) + 20          # 10.<run>.x.y: unlikely to collide
        self._tag = secrets.token_hex(2)
        self.made: list[Host] = []

    @staticmethod
    def available() -> bool:
        if os.geteuid() != 0 or shutil.which("ip") is None:
            return False
        probe = f"seqr-probe-{secrets.token_hex(3)}"
        ok = subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode == 0
        if ok:
            subprocess.run(["ip", "netns", "del", probe], capture_output=True)
        return ok

    def add(self) -> Host:
        i = len(self.made) + 1
        ns, outside, inside = f"seqr-{self._tag}-{i}", f"sq{self._tag}{i}h", f"sq{self._tag}{i}n"
        gw, addr = f"10.{self._run}.{i}.1", f"10.{self._run}.{i}.2"
        _ip("netns", "add", ns)
        host = Host(ns, gw, addr)
        self.made.append(host)
        _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        _ip("link", "set", inside, "netns", ns)
        _ip("addr", "add", f"{gw}/30", "dev", outside)
        _ip("link", "set", outside, "up")
        _ip("-n", ns, "addr", "add", f"{addr}/30", "dev", inside)
        _ip("-n", ns, "link", "set", inside, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        return host

    def close(self) -> None:
        for h in self.made:
            # Deleting the namespace removes its veth end, and with it the pair.
            subprocess.run(["ip", "netns", "del", h.ns], capture_output=True)
        self.made.clear()

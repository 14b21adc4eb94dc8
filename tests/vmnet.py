"""Stand-in EC2 VMs with addresses of their own: one network namespace per VM, for tests.

moto's VMs never boot, but moto gives each one a private address in its subnet. A
:class:`VMNetwork` holds that subnet on one machine: a bridge in a "switch" namespace, this
(root) namespace joined to it at the subnet's first address (where AWS puts the VPC's router;
moto never gives it to a VM), and, on :meth:`VMNetwork.boot`, a namespace per VM at exactly the
address moto gave it. Whatever runs there listens and connects through that address alone, so
traffic between the client, the scheduler's VM and a worker's VM crosses a real network
boundary, as it does between VMs. The filesystem stays shared.

Names carry a tag (``VMNET_TAG``, default ``rv``, plus random letters); :meth:`VMNetwork.stop`
kills every process of every VM namespace by pid and deletes what it made, nothing else.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import subprocess

import netns


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


class VMNetwork:
    """A subnet (``cidr``, a /24) on this machine, with VMs booted into it on demand."""

    def __init__(self, cidr: str) -> None:
        self.subnet = ipaddress.ip_network(cidr)
        self.router = str(next(self.subnet.hosts()))
        self.tag = os.environ.get("VMNET_TAG", "rv") + secrets.token_hex(2)
        self.switch, self.bridge = f"{self.tag}sw", f"{self.tag}br"
        self.vms: dict[str, str] = {}  # address -> namespace
        self._links = 0

    def start(self) -> VMNetwork:
        try:
            _ip("netns", "add", self.switch)
            _ip("-n", self.switch, "link", "add", self.bridge, "type", "bridge")
            _ip("-n", self.switch, "link", "set", self.bridge, "up")
            inner = self._cable(None)
            _ip("addr", "add", f"{self.router}/{self.subnet.prefixlen}", "dev", inner)
            _ip("link", "set", inner, "up")
        except BaseException:
            self.stop()
            raise
        return self

    def _cable(self, namespace: str | None) -> str:
        """A veth from ``namespace`` (None: this one) to the bridge; returns its inner end."""
        self._links += 1
        inner, outer = f"{self.tag}v{self._links}", f"{self.tag}p{self._links}"
        _ip("link", "add", inner, "type", "veth", "peer", "name", outer)
        _ip("link", "set", outer, "netns", self.switch)
        _ip("-n", self.switch, "link", "set", outer, "master", self.bridge)
        _ip("-n", self.switch, "link", "set", outer, "up")
        if namespace is not None:
            _ip("link", "set", inner, "netns", namespace)
        return inner

    def boot(self, address: str) -> list[str]:
        """Give the VM at ``address`` its namespace; returns the prefix that runs a command
        there."""
        if ipaddress.ip_address(address) not in self.subnet or address == self.router:
            raise ValueError(f"{address} is not a VM address of {self.subnet}")
        namespace = f"{self.tag}vm{len(self.vms)}"
        _ip("netns", "add", namespace)
        self.vms[address] = namespace
        inner = self._cable(namespace)
        _ip("-n", namespace, "link", "set", inner, "name", "eth0")
        _ip("-n", namespace, "addr", "add", f"{address}/{self.subnet.prefixlen}", "dev", "eth0")
        _ip("-n", namespace, "link", "set", "eth0", "up")
        _ip("-n", namespace, "link", "set", "lo", "up")
        # As in a VPC; Dask finds a VM's own address by the route towards the internet.
        _ip("-n", namespace, "route", "add", "default", "via", self.router)
        return ["ip", "netns", "exec", namespace]

    def stop(self) -> None:
        survivors = []
        for namespace in self.vms.values():
            try:
                netns.kill_all(namespace)
            except RuntimeError as error:  # delete the rest first, then say so
                survivors.append(str(error))
            subprocess.run(["ip", "netns", "delete", namespace], capture_output=True)
        # Deleting the switch takes every veth with it, this namespace's end included.
        subprocess.run(["ip", "netns", "delete", self.switch], capture_output=True)
        self.vms.clear()
        if survivors:
            raise RuntimeError("; ".join(survivors))

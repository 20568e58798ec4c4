"""A network namespace for one worker, joined to the host by one veth pair per service (private
10.213.x.y/30 addresses), so a partition takes one pair down and cuts that worker from that
service only. Forwarders inside the namespace listen on the same 127.0.0.1 ports the other
workers use, so every worker runs with identical options."""

import os
import subprocess


def ip(*args, check=True):
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


class Namespace:
    def __init__(self, services):
        """`services`: names, one veth pair each."""
        pid = os.getpid()
        self.name = f"soak{pid}"
        self.net = pid % 250 + 1
        self.links = {}
        ip("netns", "add", self.name)
        try:
            self.exec_ip("link", "set", "lo", "up")
            for i, service in enumerate(services):
                host, inner = f"sk{pid}h{i}"[-15:], f"sk{pid}n{i}"[-15:]
                ip("link", "add", host, "type", "veth", "peer", "name", inner)
                ip("link", "set", inner, "netns", self.name)
                host_addr, inner_addr = f"10.213.{self.net}.{4 * i + 1}", f"10.213.{self.net}.{4 * i + 2}"
                ip("addr", "add", f"{host_addr}/30", "dev", host)
                ip("link", "set", host, "up")
                self.exec_ip("addr", "add", f"{inner_addr}/30", "dev", inner)
                self.exec_ip("link", "set", inner, "up")
                self.links[service] = (host, host_addr)
        except Exception:
            self.delete()
            raise

    def exec_ip(self, *args):
        return ip("netns", "exec", self.name, "ip", *args)

    def prefix(self):
        return ["ip", "netns", "exec", self.name]

    def host_addr(self, service):
        return self.links[service][1]

    def set_link(self, service, up):
        ip("link", "set", self.links[service][0], "up" if up else "down")

    def delete(self):
        # Deleting the namespace deletes the veth ends inside it and with them their pairs.
        ip("netns", "del", self.name, check=False)
        for host, _ in self.links.values():
            ip("link", "del", host, check=False)

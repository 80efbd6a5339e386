"""The local test bed, the embedded default target: a Debian systemd host under systemd-nspawn
on a private LAN, and what else runs on that LAN. `python -m llamavm.testbed
{up,down,status,ssh,client}` (llamavm/testbed/__main__.py) drives the host.

One module a job; import the one that owns the name (this file re-exports nothing):
- config: config/testbed.yaml validated, the test bed's folders (Paths), the Debian mirror;
- tools: root, the outer machine's tools (installed when missing), running one of them;
- rootfs: the Debian root filesystem every machine is a copy of (debootstrap, cached by key);
- nspawn: a container's processes (spawn, PID file, stop) — the host's and each fleet host's;
- machine: the test-bed host: up, down, status, SSH, known_hosts, client_run;
- lan: the simulated LAN and the network namespaces and links under it;
- fleet: more model hosts on that LAN (`python -m llamavm.testbed.fleet`);
- localhv: this machine as the embedded VM's libvirt hypervisor;
- localinv: the local inventories' derived paths.

This file imports nothing, on purpose: inventories/local/paths.py imports localinv with the
system's python3 and the standard library only, and Python runs this file first.
"""

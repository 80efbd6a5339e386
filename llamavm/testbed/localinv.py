"""The embedded inventories' paths, derived from llamavm.paths instead of spelt in their YAML.

Each local inventory folder holds `paths.py` (one script, linked into each folder), which
Ansible runs as a second source of that inventory beside its hosts.yml: how the controller
reaches the test bed, the fleet and the embedded VMs (SSH key, pinned host keys, multiplexer
sockets) and the other controller folders an inventory names. So `$LLAMAVM_STATE` and
`$LLAMAVM_CACHE` move them all, for ansible-playbook, ansible-inventory, Molecule and testinfra
alike. Standard library only: Ansible runs it with the system's python3 (and so the package's
__init__.py imports nothing; tests/unit/testbed/test_localinv.py imports this module without site
packages).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from llamavm import paths

#: The names under a machine's state folder (the test bed's machine, its fleet, its hypervisor's
#: VMs).
SSH_KEY = "id_ed25519"
KNOWN_HOSTS = "known_hosts"
CONTROL_PATH_DIR = "cp"


def ssh(state: Path, *, pinned: bool = True) -> dict[str, str]:
    """Connection variables for hosts whose key and known_hosts live in `state`."""
    checking = "yes" if pinned else "accept-new"
    return {
        "ansible_ssh_private_key_file": str(state / SSH_KEY),
        "ansible_ssh_common_args": (
            f"-o IdentitiesOnly=yes -o UserKnownHostsFile={state / KNOWN_HOSTS} "
            f"-o StrictHostKeyChecking={checking}"
        ),
        "ansible_control_path_dir": str(state / CONTROL_PATH_DIR),
    }


def inventory(name: str) -> dict[str, Any]:
    """`ansible-inventory --list`'s shape for the local inventory `name`."""
    groups: dict[str, dict[str, Any]] = {}
    hostvars: dict[str, dict[str, Any]] = {}
    testbed = ssh(paths.testbed())
    on_testbed = name in ("local", "local-native", "local-fleet")
    groups["all"] = {"vars": dict(testbed) if on_testbed else {}}
    if name in ("local-fleet", "local-vm"):
        # llama.cpp compiled once, on the builder: its artifact kept on the controller.
        groups["all"]["vars"]["llama_cpp_artifact_dir"] = str(paths.artifacts())
    if name == "local-fleet":
        # The fleet's hosts: the test bed's key, their own pinned host keys.
        args = ssh(paths.fleet())["ansible_ssh_common_args"]
        groups["llamavm_hosts"] = {"vars": {"ansible_ssh_common_args": args}}
    if name == "local-vm":
        groups["all"]["vars"].update(ssh(paths.local_vms(), pinned=False))
        # A host's variables count only for a host the script lists (in hosts.yml's groups).
        groups["llama_cpp_builders"] = {"hosts": ["testbed"]}
        hostvars["testbed"] = testbed
        groups["llamavm_hypervisors"] = {"hosts": ["localhost"]}
        hostvars["localhost"] = {"llamavm_hypervisor_images_dir": str(paths.local_vms() / "images")}
    return {**groups, "_meta": {"hostvars": hostvars}}


def main(name: str, argv: list[str]) -> None:
    """The script inventory protocol: --list prints everything; --host H nothing more."""
    print(json.dumps(inventory(name) if "--list" in argv else {}))


if __name__ == "__main__":  # pragma: no cover - the inventories' paths.py calls main()
    main(sys.argv[1], sys.argv[2:])

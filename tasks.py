"""llamavm tasks: `invoke --list` shows them; `invoke --help TASK` shows every flag.

tasks.py stays thin: it assembles the Invoke collection. The task bodies are in llamavm/commands/
(a module per namespace, the root's by theme): they parse flags, call the llamavm package and
print. What only some tasks need (provisioning, the doctor: Jinja2, cloud-init, Proxmox) is
imported in them, so that a quick `invoke switch` does not pay for it at start-up.
"""

from __future__ import annotations

from invoke import Collection

from llamavm.commands import compose, key, provisioning, serving, testbed, testing, vm, wsl

ns = Collection(
    provisioning.models,
    provisioning.doctor,
    provisioning.provision,
    serving.switch,
    serving.stop,
    serving.status,
    serving.logs,
    testing.lint,
    testing.test,
    Collection("testbed", testbed.up, testbed.down, testbed.status, testbed.ssh),
    Collection("vm", vm.render, vm.list_vms, vm.console, vm.destroy),
    Collection("key", key.rotate),
    Collection("wsl", wsl.build),
    Collection("compose", compose.render),
)
ns.configure({"run": {"echo": False}})

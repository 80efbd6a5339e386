"""Proxmox VE: a VM spec rendered as Proxmox API calls, plus the few steps only root can do.

The same validated spec and cloud-init seed as the libvirt rendering. Through the API (a token
of a user such as llamavm@pve, with the VM.* and Datastore.AllocateSpace privileges): the
storage checks, creating the VM (q35, OVMF with an EFI disk, the cloud image imported as its
disk, a cloud-init drive with our seed as its custom user/network/meta data, the bridged NIC
with the spec's MAC, huge pages, CPU affinity), a PCI resource mapping where the site has one,
the disk's size, the start. Over SSH as root (the API can't): writing the seed's snippets and
fetching the pinned cloud image into the import storage, raw PCI passthrough without a
resource mapping (`qm set --hostpci`), and the OVMF 64-bit MMIO window (`qm set --args`).
"""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamavm.errors import LlamavmError
from llamavm.inputs import inventory as inventory_mod
from llamavm.ops import remote
from llamavm.platforms.vm import cloudinit, vmspec
from llamavm.platforms.vm.cloudinit import Seed
from llamavm.platforms.vm.vmspec import VmSpec

KIND_VAR = "llamavm_hypervisor_kind"
#: A Proxmox hypervisor's inventory variables and their defaults (None: required).
VARS: dict[str, Any] = {
    "llamavm_proxmox_api_host": "",  # empty: the host's ansible_host, else its name
    "llamavm_proxmox_api_port": 8006,
    "llamavm_proxmox_node": "",  # empty: the host name's first label
    "llamavm_proxmox_api_user": "llamavm@pve",
    "llamavm_proxmox_api_token_name": "llamavm",
    "llamavm_proxmox_api_token_file": None,  # the token's secret, in a 0600 file
    "llamavm_proxmox_verify_tls": True,  # or the path of the CA that signed the API's cert
    "llamavm_proxmox_storage": "local-lvm",  # VM disks, the EFI disk, the cloud-init drive
    "llamavm_proxmox_snippets_storage": "local",
    "llamavm_proxmox_snippets_dir": "/var/lib/vz/snippets",
    "llamavm_proxmox_import_storage": "local",
    "llamavm_proxmox_import_dir": "/var/lib/vz/import",
}
TASK_TIMEOUT_S = 900.0

FETCH_IMAGE = r"""set -eu
url=$1 sha=$2 dest=$3
[ -f "$dest" ] && exit 0
mkdir -p "$(dirname "$dest")"
curl -fsSL --retry 3 -o "$dest.part" "$url"
if ! echo "$sha  $dest.part" | sha256sum -c --status; then
  rm -f "$dest.part"
  echo "llamavm: $url does not match the pinned sha256 $sha" >&2
  exit 1
fi
mv "$dest.part" "$dest"
"""


class ProxmoxError(LlamavmError):
    """A Proxmox hypervisor's settings are wrong, or Proxmox refused a step."""

    exit_code = 2


@dataclass(frozen=True)
class Target:
    """A Proxmox VE node, from its inventory variables."""

    host: str
    api_host: str
    api_port: int
    node: str
    user: str
    token_name: str
    token_file: Path
    verify_tls: bool | str
    storage: str
    snippets_storage: str
    snippets_dir: str
    import_storage: str
    import_dir: str

    def token(self) -> str:
        """The token's secret, refused when others than its owner may read the file."""
        try:
            mode = self.token_file.stat().st_mode
            secret = self.token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ProxmoxError(
                f"host {self.host}: llamavm_proxmox_api_token_file: cannot read "
                f"{self.token_file} ({exc.strerror}) — put the API token's secret there"
            ) from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ProxmoxError(
                f"host {self.host}: llamavm_proxmox_api_token_file: {self.token_file} is "
                f"readable by others (mode {stat.S_IMODE(mode):04o}) — chmod 600 it"
            )
        if not secret:
            raise ProxmoxError(
                f"host {self.host}: llamavm_proxmox_api_token_file: {self.token_file} is "
                "empty — put the API token's secret there"
            )
        return secret


def is_proxmox(hostvars: dict[str, Any]) -> bool:
    return hostvars.get(KIND_VAR, "libvirt") == "proxmox"


def target(label: str, host: str, hostvars: dict[str, Any]) -> Target:
    """The Proxmox node `host` is, from its inventory variables (`label` names the inventory)."""
    values = {key: hostvars.get(key, default) for key, default in VARS.items()}
    token_file = values["llamavm_proxmox_api_token_file"]
    if not token_file:
        raise ProxmoxError(
            f"{label}: host {host}: llamavm_proxmox_api_token_file is not set — create an API "
            "token (Datacenter > Permissions > API Tokens) and give the path of a 0600 file "
            "holding its secret"
        )
    for key in ("llamavm_proxmox_api_port",):
        if not isinstance(values[key], int) or not 0 < values[key] < 65536:
            raise ProxmoxError(f"{label}: host {host}: {key}: {values[key]!r} is not a port")
    verify = values["llamavm_proxmox_verify_tls"]
    if not isinstance(verify, (bool, str)) or verify == "":
        raise ProxmoxError(
            f"{label}: host {host}: llamavm_proxmox_verify_tls: {verify!r} — use true, or the "
            "path of the CA certificate (Proxmox's /etc/pve/pve-root-ca.pem)"
        )
    for key in VARS.keys() - {"llamavm_proxmox_api_token_file", "llamavm_proxmox_verify_tls"}:
        value = values[key]
        if isinstance(value, str) and any(c.isspace() or c in ",;=" for c in value):
            raise ProxmoxError(
                f"{label}: host {host}: {key}: {value!r} has a space or one of , ; = — "
                "use the plain name Proxmox shows"
            )
    return Target(
        host=host,
        api_host=str(values["llamavm_proxmox_api_host"] or hostvars.get("ansible_host", host)),
        api_port=int(values["llamavm_proxmox_api_port"]),
        node=str(values["llamavm_proxmox_node"] or host.split(".")[0]),
        user=str(values["llamavm_proxmox_api_user"]),
        token_name=str(values["llamavm_proxmox_api_token_name"]),
        token_file=Path(os.path.expanduser(str(token_file))),
        verify_tls=verify,
        storage=str(values["llamavm_proxmox_storage"]),
        snippets_storage=str(values["llamavm_proxmox_snippets_storage"]),
        snippets_dir=str(values["llamavm_proxmox_snippets_dir"]),
        import_storage=str(values["llamavm_proxmox_import_storage"]),
        import_dir=str(values["llamavm_proxmox_import_dir"]),
    )


@dataclass(frozen=True)
class Step:
    """One thing done on the node: an API call, or a command run as root over SSH."""

    via: str  # api | ssh
    what: str
    method: str = ""
    path: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    argv: tuple[str, ...] = ()
    stdin: str | None = None
    task: bool = False  # the API answers a task id (UPID) to wait for

    def describe(self) -> str:
        if self.via == "api":
            args = " ".join(f"{k}={v}" for k, v in self.params.items())
            return f"API {self.method} {self.path} {args}".rstrip()
        return f"SSH root@{{node}}: {shlex.join(self.argv)}"


def pci_entries(spec: VmSpec) -> list[str]:
    """hostpciN values: the functions of one device go together (all functions, as
    Proxmox passes a multifunction GPU), a lone function alone."""
    if spec.gpu is None:
        return []
    devices: dict[str, list[str]] = {}
    for address in spec.gpu.pci:
        device, _, function = address.rpartition(".")
        devices.setdefault(device, []).append(function)
    return [
        f"{device}{'' if len(functions) > 1 else '.' + functions[0]},pcie=1"
        for device, functions in devices.items()
    ]


def image_file(spec: VmSpec) -> str:
    """The cloud image's name in the import storage, keyed by its pinned digest."""
    return f"llamavm-{spec.image.name}-{(spec.image.sha256 or '')[:12]}.qcow2"


def snippet(spec: VmSpec, kind: str) -> str:
    return f"llamavm-{spec.name}-{kind}.yaml"


def vm_config(spec: VmSpec, node: Target) -> dict[str, Any]:
    """The parameters of POST /nodes/{node}/qemu for `spec`."""
    if spec.proxmox is None:
        raise ProxmoxError(f"host {spec.host}: llamavm_vm.proxmox.vmid is not set")
    storage = node.storage
    config: dict[str, Any] = {
        "vmid": spec.proxmox.vmid,
        "name": spec.name,
        "description": f"llamavm model host {spec.host}; spec {spec.digest}",
        "ostype": "l26",
        "machine": "q35" if spec.machine == "q35" else "pc",
        "bios": "ovmf" if spec.firmware == "efi" else "seabios",
        "cpu": "host",
        "sockets": 1,
        "cores": spec.vcpus,
        "memory": spec.memory_mib,
        # A passed-through GPU DMAs into guest memory: all of it stays pinned, never ballooned.
        "balloon": 0,
        "scsihw": "virtio-scsi-single",
        "scsi0": (
            f"{storage}:0,import-from={node.import_storage}:import/{image_file(spec)},"
            "discard=on,iothread=1"
        ),
        "ide2": f"{storage}:cloudinit",
        "cicustom": ",".join(
            f"{kind}={node.snippets_storage}:snippets/{snippet(spec, kind)}"
            for kind in ("user", "network", "meta")
        ),
        "net0": f"virtio={spec.network.mac},bridge={spec.network.bridge}",
        "serial0": "socket",
        "boot": "order=scsi0",
        "onboot": 1,
    }
    if spec.firmware == "efi":
        config["efidisk0"] = f"{storage}:1,efitype=4m,pre-enrolled-keys=0"
    if spec.hugepages:
        config["numa"] = 1
        config["hugepages"] = "1024" if spec.hugepages == "1G" else "2"
    if spec.cpu_pinning:
        config["affinity"] = ",".join(str(cpu) for cpu in spec.cpu_pinning)
    if spec.gpu and spec.proxmox.pci_mapping:
        config["hostpci0"] = f"mapping={spec.proxmox.pci_mapping},pcie=1"
    return config


def plan(spec: VmSpec, seed: Seed, node: Target) -> list[Step]:
    """Every step that creates and starts `spec`'s VM on `node`, in order."""
    if spec.image.source != "download" or not spec.image.url or not spec.image.sha256:
        raise ProxmoxError(
            f"host {spec.host}: llamavm_vm.image: {spec.image.name} is built here for libvirt's "
            "kernel-direct boot — use a pinned cloud image (ubuntu-24.04, ubuntu-22.04) on Proxmox"
        )
    config = vm_config(spec, node)
    vmid = config["vmid"]
    base = f"nodes/{node.node}/qemu"
    steps = [
        Step("api", f"check {node.import_storage} takes imports", "GET",
             f"storage/{node.import_storage}"),
        Step("api", f"check {node.snippets_storage} takes snippets", "GET",
             f"storage/{node.snippets_storage}"),
    ]  # fmt: skip
    files = seed.files()
    for kind, name in (("user", "user-data"), ("network", "network-config"), ("meta", "meta-data")):
        path = f"{node.snippets_dir}/{snippet(spec, kind)}"
        steps.append(
            Step("ssh", f"write the seed's {name} snippet",
                 argv=("install", "-D", "-m", "0640", "/dev/stdin", path), stdin=files[name])
        )  # fmt: skip
    steps.append(
        Step("ssh", f"fetch the pinned {spec.image.name} image into the import storage",
             argv=("sh", "-c", FETCH_IMAGE, "llamavm-fetch", spec.image.url, spec.image.sha256,
                   f"{node.import_dir}/{image_file(spec)}"))
    )  # fmt: skip
    steps.append(Step("api", f"create VM {vmid} ({spec.name})", "POST", base, config, task=True))
    if spec.gpu and not spec.proxmox.pci_mapping:  # type: ignore[union-attr]
        options: list[str] = []
        for index, entry in enumerate(pci_entries(spec)):
            options += [f"--hostpci{index}", entry]
        steps.append(
            Step("ssh", "pass the GPU through (raw PCI: root only, no resource mapping)",
                 argv=("qm", "set", str(vmid), *options))
        )  # fmt: skip
    if spec.gpu and spec.gpu.mmio64_mib:
        value = f"-fw_cfg name=opt/ovmf/X-PciMmio64Mb,string={spec.gpu.mmio64_mib}"
        steps.append(
            Step("ssh", "raise OVMF's 64-bit MMIO window (qm args: root only)",
                 argv=("qm", "set", str(vmid), "--args", value))
        )  # fmt: skip
    steps.append(
        Step("api", f"grow the disk to {spec.disk_gib} GiB", "PUT", f"{base}/{vmid}/resize",
             {"disk": "scsi0", "size": f"{spec.disk_gib}G"}, task=True)
    )  # fmt: skip
    steps.append(Step("api", f"start VM {vmid}", "POST", f"{base}/{vmid}/status/start", task=True))
    return steps


Api = Callable[[str, str, dict[str, Any]], Any]
Ssh = Callable[[tuple[str, ...], str | None], tuple[int, str]]


def proxmoxer_api(node: Target) -> Api:
    """The API through proxmoxer, with the node's token (TLS verified unless told not to)."""
    from proxmoxer import ProxmoxAPI  # the controller's dependency (pyproject)
    from proxmoxer.core import ResourceException

    client = ProxmoxAPI(
        node.api_host,
        port=node.api_port,
        user=node.user,
        token_name=node.token_name,
        token_value=node.token(),
        verify_ssl=node.verify_tls,
        timeout=30,
    )

    def call(method: str, path: str, params: dict[str, Any]) -> Any:
        try:
            return getattr(client(path), method.lower())(**params)
        except ResourceException as exc:
            raise ApiError(exc.status_code, f"{method} {path}: {exc}") from None
        except OSError as exc:  # requests' connection errors are OSErrors
            raise ProxmoxError(
                f"host {node.host}: the Proxmox API at https://{node.api_host}:{node.api_port} "
                f"did not answer ({exc}) — check llamavm_proxmox_api_host and the firewall"
            ) from None

    return call


class ApiError(ProxmoxError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _wait(api: Api, node: Target, upid: Any, what: str) -> None:
    if not isinstance(upid, str) or not upid.startswith("UPID:"):
        return
    deadline = time.monotonic() + TASK_TIMEOUT_S
    while time.monotonic() < deadline:
        status = api("GET", f"nodes/{node.node}/tasks/{upid}/status", {})
        if isinstance(status, dict) and status.get("status") == "stopped":
            if status.get("exitstatus") != "OK":
                raise ProxmoxError(
                    f"host {node.host}: {what} failed: {status.get('exitstatus')} — see the "
                    f"task log in the Proxmox UI ({upid})"
                )
            return
        time.sleep(0.5)
    raise ProxmoxError(f"host {node.host}: {what} still runs after {TASK_TIMEOUT_S:.0f}s")


#: Added to the VM's description once every step has run: a creation cut short (the
#: controller or the network gone half-way) is taken up again, never called done.
COMPLETE = "; complete"


def apply(
    spec: VmSpec, seed: Seed, node: Target, api: Api, ssh: Ssh, say: Callable[[str], None]
) -> str:
    """Create and start `spec`'s VM unless it exists, complete, with this spec: 'created',
    'resumed' or 'unchanged'. A VM with that id and another spec is refused, never
    overwritten; one of this spec whose creation was cut short gets the steps after its
    creation again (passthrough, MMIO window, disk size, start: each idempotent)."""
    steps = plan(spec, seed, node)
    config = vm_config(spec, node)
    vmid_value = config["vmid"]
    base = f"nodes/{node.node}/qemu/{vmid_value}"
    try:
        existing = api("GET", f"{base}/config", {})
    except ApiError as exc:
        if exc.status not in (404, 500):  # Proxmox answers 500 "does not exist"
            raise
        existing = None
    verb = "created"
    if existing is not None:
        description = str(existing.get("description", ""))
        if f"spec {spec.digest}" not in description:
            raise ProxmoxError(
                f"host {spec.host}: VM {vmid_value} exists on {node.host} with another spec "
                f"({existing.get('name', '?')}) — destroy it in Proxmox, or give "
                "llamavm_vm.proxmox.vmid a free id"
            )
        if description.endswith(COMPLETE):
            say(f"llamavm: VM {vmid_value} ({spec.name}) on {node.host}: up to date")
            return "unchanged"
        say(f"llamavm: VM {vmid_value} ({spec.name}) on {node.host}: its creation was cut "
            "short; taking it up again")  # fmt: skip
        after = next(i for i, step in enumerate(steps) if step.path == f"nodes/{node.node}/qemu")
        steps, verb = steps[after + 1 :], "resumed"
    for step in steps:
        say(f"llamavm: {spec.name} on {node.host}: {step.what}")
        if step.via == "ssh":
            code, error = ssh(step.argv, step.stdin)
            if code != 0:
                raise ProxmoxError(
                    f"host {node.host}: {step.what}: failed (exit {code}): {error.strip()[-300:]}"
                )
            continue
        answer = api(step.method, step.path, step.params)
        if step.path.startswith("storage/"):
            _check_storage(node, step, answer)
        if step.task:
            _wait(api, node, answer, step.what)
    api("PUT", f"{base}/config", {"description": config["description"] + COMPLETE})
    return verb


def _check_storage(node: Target, step: Step, answer: Any) -> None:
    storage = step.path.split("/", 1)[1]
    want = "import" if "imports" in step.what else "snippets"
    content = str(answer.get("content", "")) if isinstance(answer, dict) else ""
    if want not in content.split(","):
        raise ProxmoxError(
            f"host {node.host}: storage {storage} doesn't take {want} (content: {content or '?'})"
            f" — enable it: pvesm set {storage} --content {content + ',' if content else ''}{want}"
        )


def ssh_runner(host: str, hostvars: dict[str, Any]) -> Ssh:
    """Root's steps on a Proxmox node over SSH (as root, or through sudo for another user)."""
    node = remote.host_from_vars(host, hostvars)

    def run(argv: tuple[str, ...], stdin: str | None) -> tuple[int, str]:
        command = list(argv) if node.user == "root" else ["sudo", "-n", *argv]
        try:
            proc = subprocess.run(
                node.ssh_command(command),
                input=stdin or "",
                capture_output=True,
                text=True,
                timeout=1800,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return 255, "timed out after 1800s"
        return proc.returncode, proc.stderr

    return run


def create_vms(inventory: str | None, say: Callable[[str], None], check: bool = False) -> list[str]:
    """Create (or find up to date) every VM of `inventory` whose hypervisor is Proxmox VE;
    the inventory names of those VMs. With `check`, say the steps and change nothing."""
    inv = inventory_mod.resolve(inventory)
    hostvars = remote.inventory_data(inv.path).get("_meta", {}).get("hostvars", {})
    hosts = []
    for spec in vmspec.from_inventory(inventory):
        hv = hostvars.get(spec.hypervisor, {})
        if not is_proxmox(hv):
            continue
        node = target(str(inv.path), spec.hypervisor, hv)
        seed = cloudinit.render(spec)
        if check:
            for step in plan(spec, seed, node):
                say(f"llamavm: {spec.name} on {node.host} (check): {step.describe()}")
        else:
            apply(spec, seed, node, proxmoxer_api(node), ssh_runner(spec.hypervisor, hv), say)
        hosts.append(spec.host)
    return hosts


def validate(label: str, spec: VmSpec, hostvars: dict[str, Any]) -> Target:
    """Before anything is touched: the node's settings, the VM's id and image."""
    node = target(label, spec.hypervisor, hostvars)
    if spec.proxmox is None:
        raise ProxmoxError(
            f"{label}: host {spec.host}: llamavm_vm.proxmox.vmid is missing — {spec.hypervisor} "
            "is Proxmox VE: give the VM a free id, e.g. proxmox: {vmid: 201}"
        )
    plan(spec, cloudinit.render(spec), node)
    return node

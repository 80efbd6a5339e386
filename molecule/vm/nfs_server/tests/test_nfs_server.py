"""testinfra checks of the nfs_server role on the lab's NFS server VM: kernel nfsd serves NFSv4.2
only, the model folder is exported read-only and squashed to the model host alone, and it holds
the catalog's GGUFs, readable by anyone and writable by root only."""

from __future__ import annotations

import os
import sys

EXPORT = "/srv/models"
CLIENT = "10.213.0.30"  # the model VM (inventories/local-vm/host_vars/llamavm-nas.yml)


def test_the_kernel_server_runs_and_starts_at_boot(host) -> None:
    service = host.service("nfs-server")
    assert service.is_running and service.is_enabled
    assert host.file("/proc/fs/nfsd/versions").exists  # kernel nfsd, not a userspace server


def test_only_nfs4_2_is_served(host) -> None:
    versions = host.check_output("cat /proc/fs/nfsd/versions").split()
    assert "+4.2" in versions and "-3" in versions and "-4.0" in versions, versions
    assert not host.service("rpcbind").is_running  # NFSv4 only: no portmapper on the wire


def test_the_export_is_read_only_squashed_and_for_the_model_host_alone(host) -> None:
    exports = host.check_output("exportfs -s")
    lines = [line for line in exports.splitlines() if line.startswith(EXPORT + " ")]
    assert len(lines) == 1, exports
    client, options = lines[0].split()[1].split("(", 1)
    assert client == CLIENT
    options = options.rstrip(")").split(",")
    for option in ("ro", "root_squash", "all_squash", "secure", "sync", "no_subtree_check"):
        assert option in options, options
    assert "rw" not in options and "no_root_squash" not in options


def _catalog_files() -> list[str]:
    """The lab catalog's GGUFs, relative to the share (what the model host will ask for)."""
    sys.path.insert(0, os.environ["MOLECULE_PROJECT_DIRECTORY"])
    from llamavm.inputs import catalog, inventory

    inv = inventory.resolve("local-vm")
    models = catalog.load(catalog.catalog_path(None, inv.catalog))
    return [str(m.gguf) for m in models.models]


def test_the_export_holds_the_catalog_files_readable_by_anyone(host) -> None:
    folder = host.file(EXPORT)
    assert folder.user == "root" and folder.mode & 0o022 == 0
    wanted = _catalog_files()
    listing = host.check_output(f"find {EXPORT} -name '*.gguf' -printf '%u %m %s %P\\n'")
    files = [line.split(None, 3) for line in listing.splitlines()]
    assert set(wanted) <= {path for *_, path in files}, (wanted, listing)
    for user, mode, size, path in files:
        assert user == "root" and int(mode, 8) & 0o004 and not int(mode, 8) & 0o022, path
        assert int(size) > 0
        assert host.run(f"head -c 4 {EXPORT}/{path}").stdout == "GGUF", path


def test_only_nfsd_listens_on_the_network(host) -> None:
    """NFSv4 only: no portmapper (111), no statd or mountd on the wire; SSH and nfsd alone."""
    listening = host.check_output("ss -H -tuln")
    ports = set()
    for line in listening.splitlines():
        local = line.split()[4]
        address, port = local.rsplit(":", 1)
        if not address.startswith(("127.", "[::1]")):
            ports.add(int(port))
    assert ports == {22, 2049}, listening

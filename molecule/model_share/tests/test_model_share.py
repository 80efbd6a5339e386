"""testinfra checks of the model_share role on the test bed: the catalog's GGUFs are in the
share, which the model host can read but not write."""

from __future__ import annotations

import json


def _contract(host) -> dict:
    """The host contract `invoke provision` wrote (what the roles were given)."""
    return json.loads(host.file("/etc/llamavm/contract.json").content_string)


def test_every_catalog_gguf_is_in_the_share_and_readable(host) -> None:
    contract = _contract(host)
    for model in contract["models"]:
        gguf = host.file(f"{contract['share_path']}/{model['gguf_in_share']}")
        assert gguf.exists, model["name"]
        if model["size_bytes"] is not None:  # pinned in the catalog: the size must match
            assert gguf.size == model["size_bytes"], model["name"]
        assert host.run(f"head -c 4 {gguf.path}").stdout == "GGUF"


def test_the_share_is_read_only(host) -> None:
    contract = _contract(host)
    probe = host.run(f"touch {contract['share_path']}/.llamavm-write-probe")
    assert probe.rc != 0 and "Read-only file system" in probe.stderr
    mount = json.loads(host.check_output(f"findmnt -J -o TARGET,OPTIONS {contract['share_path']}"))
    assert "ro" in mount["filesystems"][0]["options"].split(",")

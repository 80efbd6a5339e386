"""remote.hosts keeps what `ansible-inventory` said for a static inventory (it takes ~0.4 s of
every quick `invoke switch`) and asks again when anything it reads changes."""

from __future__ import annotations

import contextlib
import stat
from pathlib import Path

import pytest

from llamavm.errors import LlamavmError
from llamavm.ops import remote

HOSTS = """---
llamavm_hosts:
  hosts:
    gpu1:
      ansible_host: 10.0.0.5
      ansible_user: ops
      ansible_port: 2222
    gpu2:
      ansible_host: 10.0.0.6
"""


@pytest.fixture
def asked(monkeypatch, tmp_path) -> list[Path]:
    """Every call to ansible-inventory (the real one) is listed here."""
    monkeypatch.setenv("LLAMAVM_CACHE", str(tmp_path / "cache"))
    calls: list[Path] = []
    real = remote.inventory_data

    def counting(inventory: Path):
        calls.append(inventory)
        return real(inventory)

    monkeypatch.setattr(remote, "inventory_data", counting)
    return calls


def _inventory(tmp_path: Path, text: str = HOSTS) -> Path:
    inv = tmp_path / "site"
    inv.mkdir(exist_ok=True)
    (inv / "hosts.yml").write_text(text)
    return inv


def test_a_static_inventory_is_asked_once_until_a_file_changes(tmp_path, asked) -> None:
    inv = _inventory(tmp_path)
    first = remote.hosts(inv)
    assert [(h.name, h.address, h.user, h.port) for h in first] == [
        ("gpu1", "10.0.0.5", "ops", 2222),
        ("gpu2", "10.0.0.6", None, None),
    ]
    assert remote.hosts(inv) == first and remote.hosts(inv, "gpu2") == first[1:]
    assert len(asked) == 1
    cached = next((tmp_path / "cache" / "inventory").glob("*.json"))
    assert stat.S_IMODE(cached.stat().st_mode) == 0o600
    _inventory(tmp_path, HOSTS.replace("10.0.0.6", "10.0.0.7"))
    assert remote.hosts(inv)[1].address == "10.0.0.7"
    assert len(asked) == 2


def test_an_unknown_host_is_refused_from_the_cache_too(tmp_path, asked) -> None:
    inv = _inventory(tmp_path)
    remote.hosts(inv)
    with pytest.raises(LlamavmError, match="no host 'gpu9' in llamavm_hosts — hosts: gpu1, gpu2"):
        remote.hosts(inv, "gpu9")
    assert len(asked) == 1


@pytest.mark.parametrize(
    "extra",
    ["ansible_password: !vault |\n  $ANSIBLE_VAULT;1.1;AES256\n  6162\n",
     "ansible_host: \"{{ lookup('env', 'GPU_HOST') }}\"\n"],
)  # fmt: skip
def test_an_inventory_that_may_answer_otherwise_is_asked_every_time(tmp_path, asked, extra) -> None:
    inv = _inventory(tmp_path)
    (inv / "host_vars").mkdir()
    (inv / "host_vars" / "gpu2.yml").write_text("---\n" + extra)
    for _ in range(2):
        # the vault can't be opened here; what matters is that it was asked each time
        with contextlib.suppress(LlamavmError):
            remote.hosts(inv)
    assert len(asked) == 2


def test_the_local_inventory_derives_its_paths_and_is_cached_per_state_folder(
    monkeypatch, tmp_path, asked
) -> None:
    """inventories/local's paths.py is a script, yet a function of llamavm's folders only: its
    hosts are kept, and asked again (with the paths moved) when $LLAMAVM_STATE moves."""
    from llamavm import REPO_ROOT

    local = REPO_ROOT / "inventories" / "local"
    monkeypatch.setenv("LLAMAVM_STATE", str(tmp_path / "one"))
    first = remote.hosts(local)
    assert first[0].key == str(tmp_path / "one" / "testbed" / "id_ed25519")
    assert f"UserKnownHostsFile={tmp_path / 'one' / 'testbed' / 'known_hosts'}" in first[0].ssh_args
    assert remote.hosts(local) == first and len(asked) == 1
    monkeypatch.setenv("LLAMAVM_STATE", str(tmp_path / "two"))
    assert remote.hosts(local)[0].key == str(tmp_path / "two" / "testbed" / "id_ed25519")
    assert len(asked) == 2

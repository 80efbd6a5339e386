"""The one walk of an inventory's model hosts (llamavm.ops.remote.model_hosts), on answers shaped
like `ansible-inventory --list`'s: children, order, each host once, `only`, other groups, errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from llamavm.errors import LlamavmError
from llamavm.ops import remote

INVENTORY = Path("inventories/site")
DATA = {
    "_meta": {"hostvars": {"b": {"ansible_port": 2222}, "nfs": {"role": "nfs"}}},
    "all": {"children": ["llamavm_hosts", "nfs_servers", "ungrouped"]},
    "llamavm_hosts": {"hosts": ["b"], "children": ["rack1"]},
    "rack1": {"hosts": ["a", "b"], "children": ["rack2"]},
    "rack2": {"hosts": ["c"]},
    "nfs_servers": {"hosts": ["nfs", "a"]},
}


def test_the_model_hosts_are_the_groups_and_its_childrens_in_order_each_once() -> None:
    found = remote.model_hosts(DATA, INVENTORY)
    assert list(found) == ["b", "a", "c"]
    assert found["b"] == {"ansible_port": 2222} and found["a"] == {}  # no vars: empty


def test_only_picks_one_model_host_and_names_them_when_it_is_none_of_them() -> None:
    assert list(remote.model_hosts(DATA, INVENTORY, "c")) == ["c"]
    with pytest.raises(LlamavmError, match=r"no host 'nfs' in llamavm_hosts — hosts: b, a, c$"):
        remote.model_hosts(DATA, INVENTORY, "nfs")


def test_other_groups_follow_without_repeating_a_host() -> None:
    found = remote.model_hosts(DATA, INVENTORY, also=("nfs_servers", "absent"))
    assert list(found) == ["b", "a", "c", "nfs"]
    assert found["nfs"] == {"role": "nfs"}


def test_an_inventory_without_model_hosts_says_where_to_add_them() -> None:
    data = {**DATA, "llamavm_hosts": {}}
    with pytest.raises(LlamavmError, match="no hosts in group llamavm_hosts — add your model"):
        remote.model_hosts(data, INVENTORY, also=("nfs_servers",))

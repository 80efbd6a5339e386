"""Many model hosts at once: which hosts a pattern names (as Ansible reads it), and work on
each of them in parallel, a bounded number at a time, one result per host.

A failure on one host is that host's result: it never stops or touches the others.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import TypeVar

from llamavm import remote
from llamavm.errors import LlamavmError

#: How many hosts are worked on at once by default (Ansible's default forks is 5; ours
#: are mostly waiting on SSH and on the hosts' own transactions).
FORKS = 10

T = TypeVar("T")


def pick(inventory: Path, pattern: str | None) -> list[remote.Host]:
    """The model hosts (group llamavm_hosts) that `pattern` names, in inventory order.

    A pattern is what `ansible --limit` takes: a host, a group, globs (`gpu-*`), regexes
    (`~gpu-[12]`), unions (`a:b` or `a,b`), intersections (`&group`) and exclusions (`!host`).
    """
    hosts = remote.hosts(inventory)
    if not pattern:
        return hosts
    if pattern in {h.name for h in hosts}:  # the common case, without loading the inventory
        return [h for h in hosts if h.name == pattern]
    matched = _ansible_hosts(inventory, pattern)
    chosen = [h for h in hosts if h.name in matched]
    if not chosen:
        names = ", ".join(h.name for h in hosts)
        raise LlamavmError(
            f"{inventory}: the host pattern {pattern!r} matches no host of {remote.GROUP} — "
            f"hosts: {names}",
            code=2,
        )
    return chosen


def _ansible_hosts(inventory: Path, pattern: str) -> set[str]:
    """The hosts Ansible's own inventory manager matches for `pattern`."""
    from ansible.inventory.manager import InventoryManager
    from ansible.parsing.dataloader import DataLoader

    try:
        manager = InventoryManager(loader=DataLoader(), sources=[str(inventory)])
        return {host.name for host in manager.get_hosts(pattern=pattern)}
    except Exception as exc:  # Ansible's errors for a malformed pattern
        raise LlamavmError(
            f"{inventory}: the host pattern {pattern!r} is not one Ansible reads ({exc}) — "
            "see `ansible --limit` for the syntax",
            code=2,
        ) from None


def each(
    targets: list[remote.Host],
    work: Callable[[remote.Host], T],
    done: Callable[[remote.Host, T | BaseException], None] | None = None,
    *,
    forks: int = FORKS,
) -> list[tuple[remote.Host, T | BaseException]]:
    """`work` on every target, at most `forks` at once; each result (or the exception it
    raised) in target order. `done` hears of each as it finishes (from one thread at a time)."""
    if forks < 1:
        raise LlamavmError(f"--forks {forks}: use 1 or more", code=2)
    results: dict[str, T | BaseException] = {}
    lock = threading.Lock()

    def finish(target: remote.Host, result: T | BaseException) -> None:
        with lock:
            results[target.name] = result
            if done is not None:
                done(target, result)

    if len(targets) == 1 or forks == 1:
        for target in targets:
            try:
                outcome: T | BaseException = work(target)
            except Exception as exc:
                outcome = exc
            finish(target, outcome)
    else:
        with ThreadPoolExecutor(max_workers=min(forks, len(targets))) as pool:
            futures = {pool.submit(work, target): target for target in targets}
            for future in as_completed(futures):
                error = future.exception()
                finish(futures[future], error if error is not None else future.result())
    return [(target, results[target.name]) for target in targets]

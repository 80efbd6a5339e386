"""Many model hosts at once: which hosts a pattern names (as Ansible reads it), and work on
each of them in parallel, a bounded number at a time, one result per host.

A failure on one host is that host's result: it never stops or touches the others.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from llamavm.errors import LlamavmError
from llamavm.ops import remote

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
    matched = ansible_hosts(inventory, pattern)
    chosen = [h for h in hosts if h.name in matched]
    if not chosen:
        names = ", ".join(h.name for h in hosts)
        raise LlamavmError(
            f"{inventory}: the host pattern {pattern!r} matches no host of {remote.GROUP} — "
            f"hosts: {names}",
            code=2,
        )
    return chosen


def ansible_hosts(inventory: Path, pattern: str) -> set[str]:
    """The hosts Ansible's own inventory manager matches for `pattern`."""
    from ansible.inventory.manager import InventoryManager
    from ansible.parsing.dataloader import DataLoader

    from ansible import constants

    # No match is our one-line error, not Ansible's warning before it.
    constants.HOST_PATTERN_MISMATCH = "ignore"
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
    raised) in target order. `done` hears of each as it finishes, in this thread.

    The workers are daemon threads: an interrupt (Ctrl-C) reaches this thread and goes up at
    once, never waiting for the hosts (whose transactions run on by themselves)."""
    if forks < 1:
        raise LlamavmError(f"--forks {forks}: use 1 or more", code=2)
    results: dict[str, T | BaseException] = {}
    if len(targets) == 1 or forks == 1:
        for target in targets:
            try:
                outcome: T | BaseException = work(target)
            except Exception as exc:
                outcome = exc
            results[target.name] = outcome
            if done is not None:
                done(target, outcome)
        return [(target, results[target.name]) for target in targets]
    finished: queue.Queue[tuple[remote.Host, T | BaseException]] = queue.Queue()
    slots = threading.BoundedSemaphore(forks)

    def worker(target: remote.Host) -> None:
        with slots:
            try:
                outcome: T | BaseException = work(target)
            except Exception as exc:
                outcome = exc
        finished.put((target, outcome))

    def start() -> None:
        for target in targets:
            threading.Thread(target=worker, args=(target,), daemon=True).start()

    threading.Thread(target=start, daemon=True).start()
    while len(results) < len(targets):
        target, outcome = finished.get()
        results[target.name] = outcome
        if done is not None:
            done(target, outcome)
    return [(target, results[target.name]) for target in targets]

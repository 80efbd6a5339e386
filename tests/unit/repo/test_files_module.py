"""ansible/library/llamavm_files.py through a real ansible-playbook run on this machine
(connection local): a role's small files in one module run — written only when they differ,
checked before they replace the old ones, stale ones pruned, nothing done in check mode — and
what the converge record learns from it (the llamavm_observe callback)."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from llamavm.ops import converge, playbook


def _run(tmp_path: Path, args: dict[str, Any], *flags: str) -> tuple[int, dict[str, Any], str]:
    """One task: llamavm_files with `args`, inside a role `demo`; (rc, its result, output)."""
    role = tmp_path / "roles" / "demo" / "tasks"
    role.mkdir(parents=True, exist_ok=True)
    task = [{"name": "Files", "llamavm_files": args, "register": "got"},
            {"name": "Keep", "ansible.builtin.copy": {
                "content": "{{ got | to_json }}", "dest": str(tmp_path / "result.json"),
                "mode": "0600"}, "check_mode": False}]  # fmt: skip
    role.joinpath("main.yml").write_text(yaml.safe_dump(task))
    play = tmp_path / "play.yml"
    play.write_text(
        "- hosts: all\n  gather_facts: false\n  tasks:\n"
        "    - ansible.builtin.include_role: {name: demo}\n"
    )
    inventory = tmp_path / "hosts.yml"
    inventory.write_text(
        "all:\n  hosts:\n    here:\n      ansible_connection: local\n"
        f"      ansible_python_interpreter: {sys.executable}\n      ansible_become: false\n"
    )
    lines: list[str] = []
    (tmp_path / "result.json").unlink(missing_ok=True)
    rc, _ = playbook.run_playbook(
        play,
        inventory,
        {},
        check="--check" in flags,
        echo=lines.append,
        env={
            "LLAMAVM_OBSERVE": str(tmp_path / "observed.json"),
            "ANSIBLE_ROLES_PATH": str(tmp_path / "roles"),
        },
    )
    result = tmp_path / "result.json"
    return rc, json.loads(result.read_text()) if result.exists() else {}, "".join(lines)


@pytest.fixture
def work(tmp_path: Path) -> Path:
    folder = tmp_path / "work"
    folder.mkdir()
    return folder


def _spec(work: Path, **more: Any) -> dict[str, Any]:
    return {
        "directories": [str(work / "staged"), {"path": str(work / "private"), "mode": "0700"}],
        "files": [
            {"path": str(work / "staged" / "a.service"), "content": "[Unit]\nA\n", "mode": "0644"},
            {"path": str(work / "private" / "rules"), "content": "secret\n", "mode": "0600"},
        ],
        **more,
    }


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.skipif(os.geteuid() != 0, reason="owners root:root need root")
def test_files_are_written_once_then_left_alone_and_fixed_when_changed(tmp_path, work) -> None:
    rc, got, out = _run(tmp_path, _spec(work))
    assert rc == 0, out
    assert got["changed"] and got["changed_paths"] == [
        str(work / "staged"), str(work / "private"),
        str(work / "staged" / "a.service"), str(work / "private" / "rules"),
    ]  # fmt: skip
    assert (work / "staged" / "a.service").read_text() == "[Unit]\nA\n"
    assert _mode(work / "private") == 0o700 and _mode(work / "private" / "rules") == 0o600
    rc, again, out = _run(tmp_path, _spec(work))
    assert rc == 0 and not again["changed"] and again["changed_paths"] == [], out
    # A hand edit and a mode change: exactly those two are put back.
    (work / "staged" / "a.service").write_text("edited\n")
    (work / "private" / "rules").chmod(0o644)
    rc, fixed, _ = _run(tmp_path, _spec(work))
    assert fixed["changed_paths"] == [str(work / "staged" / "a.service"),
                                      str(work / "private" / "rules")]  # fmt: skip
    assert (work / "staged" / "a.service").read_text() == "[Unit]\nA\n"
    assert _mode(work / "private" / "rules") == 0o600
    assert not list(work.rglob(".*.*"))  # no temporary files left behind


@pytest.mark.skipif(os.geteuid() != 0, reason="owners root:root need root")
def test_a_file_its_check_refuses_is_not_written_and_the_old_one_stays(tmp_path, work) -> None:
    assert _run(tmp_path, _spec(work))[0] == 0
    spec = _spec(work)
    spec["files"][0] = {**spec["files"][0], "content": "broken\n",
                        "validate": "grep -q '^\\[Unit\\]' %s"}  # fmt: skip
    rc, _, out = _run(tmp_path, spec)
    assert rc != 0
    assert "refused it" in out
    assert (work / "staged" / "a.service").read_text() == "[Unit]\nA\n"
    assert not list(work.rglob(".a.service.*"))


@pytest.mark.parametrize(
    ("change", "said"),
    [
        ({"path": "relative/a.conf"}, "is not absolute"),
        ({"mode": "rw-r--r--"}, "is not an octal mode"),
        ({"owner": "no-such-user-llamavm"}, "no user named 'no-such-user-llamavm'"),
    ],
)
def test_bad_input_fails_in_one_line_and_writes_nothing(tmp_path, work, change, said) -> None:
    spec = _spec(work)
    spec["files"][0] = {**spec["files"][0], **change}
    rc, _, out = _run(tmp_path, spec)
    assert rc != 0
    assert said in out and "Traceback" not in out
    assert not (work / "staged" / "a.service").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="owners root:root need root")
def test_stale_and_absent_files_go_and_check_mode_changes_nothing(tmp_path, work) -> None:
    assert _run(tmp_path, _spec(work))[0] == 0
    (work / "staged" / "old.service").write_text("gone\n")
    (work / "staged" / "keep.txt").write_text("not a unit\n")
    (work / "legacy.conf").write_text("old\n")
    more = {"prune": [{"path": str(work / "staged"), "patterns": ["*.service"]}],
            "absent": [str(work / "legacy.conf")]}  # fmt: skip
    rc, checked, out = _run(tmp_path, _spec(work, **more), "--check")
    assert rc == 0, out
    assert checked["changed_paths"] == [
        str(work / "legacy.conf"),
        str(work / "staged" / "old.service"),
    ]
    assert (work / "staged" / "old.service").exists() and (work / "legacy.conf").exists()
    rc, done, _ = _run(tmp_path, _spec(work, **more))
    assert done["changed_paths"] == checked["changed_paths"]
    assert not (work / "staged" / "old.service").exists() and not (work / "legacy.conf").exists()
    assert (work / "staged" / "keep.txt").exists() and (work / "staged" / "a.service").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="owners root:root need root")
def test_the_converge_record_learns_every_file_of_the_one_run(tmp_path, work) -> None:
    assert _run(tmp_path, _spec(work, absent=[str(work / "legacy.conf")]))[0] == 0
    seen = json.loads((tmp_path / "observed.json").read_text())["hosts"]["here"]
    files = {f["path"]: f["content"] for f in seen["files"]}
    assert files[str(work / "staged" / "a.service")] is True  # its content is the role's
    assert files[str(work / "private" / "rules")] is True
    assert files[str(work / "staged")] is False and files[str(work / "legacy.conf")] is False
    owners = converge.owners(seen)["files"]
    assert owners[str(work / "staged" / "a.service")] == ["demo"]

"""The converge record and the drift probe: the module's snapshot and comparison, the callback
that sees what roles manage, the digest of a converge's inputs — and the whole loop through a
real ansible-playbook on this machine (connection local, a temporary folder)."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

from llamavm import REPO_ROOT
from llamavm.ops import converge, playbook, provision

MODULE = REPO_ROOT / "ansible" / "library" / "llamavm_converge.py"


def _load_module():
    spec = importlib.util.spec_from_file_location("llamavm_converge", MODULE)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


mod = _load_module()


def _params(tmp_path: Path, **extra) -> dict:
    return {
        "digest": "d1",
        "path": str(tmp_path / "state" / "converge.json"),
        "files": [],
        "units": [],
        "packages": [],
        "hooks": [],
        **extra,
    }


def test_a_record_then_an_unchanged_host_has_no_drift(tmp_path: Path) -> None:
    unit = tmp_path / "demo.service"
    unit.write_text("[Service]\nExecStart=/bin/true\n")
    link = tmp_path / "current"
    link.symlink_to("builds/a")
    files = [{"path": str(unit), "content": True}, {"path": str(link), "content": False}]
    params = _params(tmp_path, files=files)
    assert mod.record(params)["checked"] == 2
    assert (tmp_path / "state" / "converge.json").stat().st_mode & 0o777 == 0o600
    assert mod.verify(params) == {"drift": [], "checked": 2, "owned": True, "roles": []}


def test_hand_edits_are_drift_named_by_path(tmp_path: Path) -> None:
    unit = tmp_path / "demo.service"
    unit.write_text("[Service]\nExecStart=/bin/true\n")
    key = tmp_path / "api-key"
    key.write_text("k" * 40)
    key.chmod(0o600)
    link = tmp_path / "current"
    link.symlink_to("builds/a")
    gone = tmp_path / "legacy.conf"
    files = [
        {"path": str(unit), "content": True},
        {"path": str(key), "content": False},
        {"path": str(link), "content": False},
        {"path": str(gone), "content": False},
    ]
    params = _params(tmp_path, files=files)
    mod.record(params)
    unit.write_text("[Service]\nExecStart=/bin/false\n")
    key.write_text("")
    key.chmod(0o644)
    link.unlink()
    link.symlink_to("builds/b")
    gone.write_text("back\n")
    drift = mod.verify(params)["drift"]
    assert f"{unit}: content changed" in drift
    assert f"{key}: emptied, mode 0644 (was 0600)" in drift
    assert f"{link}: points to builds/b (was builds/a)" in drift
    assert f"{gone}: appeared (it was removed)" in drift
    unit.unlink()
    assert f"{unit}: deleted" in mod.verify(params)["drift"]


def test_a_key_rotated_in_place_is_not_drift(tmp_path: Path) -> None:
    # Files the role creates but does not own (copy force: false, file state: file): only
    # their type, mode, owner and emptiness count, not their content.
    key = tmp_path / "api-key"
    key.write_text("a" * 40)
    params = _params(tmp_path, files=[{"path": str(key), "content": False}])
    mod.record(params)
    key.write_text("b" * 40)
    assert mod.verify(params)["drift"] == []


def test_no_record_a_malformed_one_or_other_inputs_are_drift(tmp_path: Path) -> None:
    params = _params(tmp_path)
    assert mod.verify(params)["drift"] == ["no record of an earlier converge"]
    record = Path(params["path"])
    record.parent.mkdir(parents=True)
    record.write_text("{not json")
    assert "unreadable" in mod.verify(params)["drift"][0]
    record.write_text('["a list"]')
    assert "malformed" in mod.verify(params)["drift"][0]
    mod.record(params)
    assert mod.verify({**params, "digest": "d2"})["drift"] == [
        "what shapes the converge changed since the last one"
    ]


def _fake_tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, units: dict, packages: dict):
    """systemctl show and dpkg-query stand-ins answering from `units` / `packages`."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    (tmp_path / "units.json").write_text(json.dumps(units))
    (tmp_path / "packages.json").write_text(json.dumps(packages))
    (bindir / "systemctl").write_text(
        f"#!{sys.executable}\nimport json, sys\n"
        f"units = json.load(open({str(tmp_path / 'units.json')!r}))\n"
        "names = [a for a in sys.argv[2:] if not a.startswith('-')]\n"
        "print('\\n\\n'.join(f'Id={n}\\nLoadState=loaded\\nUnitFileState={units[n][0]}\\n"
        "ActiveState={units[n][1]}' for n in names))\n"
    )
    (bindir / "dpkg-query").write_text(
        f"#!{sys.executable}\nimport json, sys\n"
        f"pkgs = json.load(open({str(tmp_path / 'packages.json')!r}))\n"
        "for n in sys.argv[3:]:\n"
        "    if n in pkgs: print(f'{n}\\t{pkgs[n]} ')\n"
    )
    for tool in bindir.iterdir():
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")


def test_stopped_or_disabled_units_and_removed_packages_are_drift(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    units = {"caddy.service": ["enabled", "active"], "apt-daily.timer": ["enabled", "active"]}
    _fake_tools(tmp_path, monkeypatch, units, {"caddy": "ii", "nftables": "ii"})
    params = _params(
        tmp_path,
        # caddy was started by its role; the timer only enabled (its active state is its own)
        units=[{"name": "caddy.service", "active": True}, {"name": "apt-daily.timer"}],
        packages=["caddy", "nftables"],
    )
    mod.record(params)
    assert mod.verify(params)["drift"] == []
    units["apt-daily.timer"][1] = "inactive"  # not asked for: no drift
    _fake_tools(tmp_path, monkeypatch, units, {"caddy": "ii", "nftables": "ii"})
    assert mod.verify(params)["drift"] == []
    units["caddy.service"] = ["enabled", "failed"]
    units["apt-daily.timer"][0] = "disabled"
    _fake_tools(tmp_path, monkeypatch, units, {"caddy": "ii", "nftables": "rc"})
    drift = mod.verify(params)["drift"]
    assert "unit caddy.service: failed (was active)" in drift
    assert "unit apt-daily.timer: loaded/disabled (was loaded/enabled)" in drift
    assert "package nftables: not installed (was installed)" in drift


def test_hooks_report_their_own_drift_and_a_failing_hook_is_drift(tmp_path: Path) -> None:
    hook = tmp_path / "hook"
    hook.write_text(f'#!{sys.executable}\nimport json; print(json.dumps({{"drift": ["x"]}}))\n')
    hook.chmod(0o755)
    params = _params(tmp_path, hooks=[[str(hook)]])
    mod.record(params)
    assert mod.verify(params)["drift"] == ["x"]
    hook.write_text("#!/bin/sh\necho broken >&2\nexit 2\n")
    assert mod.verify(params)["drift"] == ["hook : exit 2 (broken)"]
    hook.unlink()
    assert "could not ask" in mod.verify(params)["drift"][0]


def test_the_fingerprint_sees_a_gpu_tool_appear(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    params = _params(tmp_path)
    bindir = tmp_path / "gpu"
    bindir.mkdir()
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    if mod.fingerprint()["nvidia-smi"] is not None:
        pytest.skip("this machine has an nvidia-smi of its own")
    mod.record(params)
    tool = bindir / "nvidia-smi"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    assert mod.verify(params)["drift"] == ["the host changed: nvidia-smi"]


def test_the_digest_follows_inputs_file_contents_and_host_vars(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLAMAVM_CACHE", str(tmp_path / "cache"))
    archive = tmp_path / "src.tar"
    archive.write_bytes(b"one")
    inputs = {"provision": {"llama_cpp_source_archive": str(archive), "x": [1, 2]}}
    hostvars = {"a": {"ansible_host": "10.0.0.1"}, "b": {"ansible_host": "10.0.0.2"}}
    first = converge.digests(inputs, hostvars)
    assert first == converge.digests(inputs, hostvars)
    assert first["a"] != first["b"]
    archive.write_bytes(b"two")  # same path, other content
    second = converge.digests(inputs, hostvars)
    assert second["a"] != first["a"]
    changed = converge.digests({"provision": {**inputs["provision"], "x": [1]}}, hostvars)
    assert changed["a"] != second["a"]
    moved = converge.digests(inputs, {**hostvars, "a": {"ansible_host": "10.0.0.9"}})
    assert moved["a"] != second["a"] and moved["b"] == second["b"]


def test_the_tree_digest_changes_with_any_role_file(tmp_path: Path) -> None:
    (tmp_path / "roles" / "r" / "tasks").mkdir(parents=True)
    task = tmp_path / "roles" / "r" / "tasks" / "main.yml"
    task.write_text("---\n")
    before = converge.tree_digest(tmp_path)
    task.write_text("---\n- name: x\n")
    assert converge.tree_digest(tmp_path) != before


def test_report_and_repaired_lines_name_the_host_and_the_drift() -> None:
    found = converge.Plan(Path("inv"), {"a": "1", "b": "2", "c": "3"}, "/r")
    found.up_to_date = {"a": 12}
    found.drift = {
        "b": ["/etc/x: content changed", "unit y: failed (was active)"],
        "c": ["no converge of it recorded by this controller"],
    }
    lines: list[str] = []
    converge.report(found, lines.append)
    assert lines[0].startswith("llamavm: a: up to date") and "12 managed items" in lines[0]
    assert "llamavm: b: converging — 2 differences" in lines
    assert "llamavm: b:   /etc/x: content changed" in lines
    assert "llamavm: c: converging — no converge of it recorded by this controller" in lines
    repaired = converge.repaired_lines(found, {"b": 2, "c": 40})
    assert repaired == [
        "llamavm: b: repaired (2 changes): /etc/x: content changed; unit y: failed (was active)"
    ]


PLAY = """\
- hosts: all
  gather_facts: false
  tasks:
    - ansible.builtin.copy: {{content: "owned\\n", dest: "{d}/owned.conf", mode: "0644"}}
    - ansible.builtin.copy: {{content: "made once\\n", dest: "{d}/key", mode: "0600",
                             force: false}}
    - ansible.builtin.file: {{path: "{d}/dir", state: directory, mode: "0755"}}
    - ansible.builtin.file: {{src: "{d}/dir", dest: "{d}/link", state: link}}
    - ansible.builtin.template: {{src: "{t}", dest: "{d}/templated.conf", mode: "0644"}}
    - ansible.builtin.file: {{path: "{d}/f-{{{{ item }}}}", state: touch, mode: "0644"}}
      loop: [1, 2]
    - ansible.builtin.file: {{path: "{d}/skipped", state: touch}}
      when: false
    - ansible.builtin.stat: {{path: "{d}/link"}}
    - ansible.builtin.stat: {{path: "{d}/never"}}
    - ansible.builtin.copy: {{content: "elsewhere", dest: "{d}/delegated"}}
      delegate_to: localhost
"""


def test_the_whole_loop_through_ansible_playbook(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Converge a play with the callback on, record what it saw with converge.yml, probe:
    nothing; hand-edit a file: the probe names it; a converge repairs it."""
    monkeypatch.setenv("LLAMAVM_STATE", str(tmp_path / "controller"))
    work = tmp_path / "work"
    work.mkdir()
    inventory = tmp_path / "hosts.yml"
    inventory.write_text(
        "all:\n  hosts:\n    here:\n      ansible_connection: local\n"
        f"      ansible_python_interpreter: {sys.executable}\n      ansible_become: false\n"
    )
    play = tmp_path / "play.yml"
    template = tmp_path / "t.j2"
    template.write_text("{{ 1 + 1 }}\n")
    play.write_text(PLAY.format(d=work, t=template))
    observed = tmp_path / "observed.json"
    for _ in range(2):  # the second converge changes nothing: what it reports then counts too
        rc, _ = playbook.run_playbook(
            play, inventory, {}, echo=lambda _: None, env={"LLAMAVM_OBSERVE": str(observed)}
        )
        assert rc == 0
    seen = json.loads(observed.read_text())["hosts"]["here"]
    files = {f["path"]: f["content"] for f in seen["files"]}
    assert files == {
        f"{work}/owned.conf": True,
        f"{work}/templated.conf": True,
        f"{work}/key": False,
        f"{work}/dir": False,
        f"{work}/link": False,
        f"{work}/f-1": False,
        f"{work}/f-2": False,
        f"{work}/never": False,
    }
    record_path = str(tmp_path / "state" / "converge.json")
    found = converge.Plan(inventory, {"here": "digest-1"}, record_path)
    assert converge.record(found, {"hosts": {"here": seen}}, ["here"]) == []
    probe = {"here": {"state": "verify", "digest": "digest-1", "path": record_path}}
    rc, answers, output = converge.run_converge_play(inventory, probe)
    assert rc == 0, output
    assert answers["probe"]["here"] == {"drift": [], "checked": 8, "owned": True, "roles": []}
    (work / "owned.conf").write_text("edited by hand\n")
    (work / "templated.conf").write_text("3\n")
    (work / "key").write_text("rotated, not drift\n")
    _, answers, _ = converge.run_converge_play(inventory, probe)
    assert answers["probe"]["here"]["drift"] == [
        f"{work}/owned.conf: content changed",
        f"{work}/templated.conf: content changed",
    ]
    assert playbook.run_playbook(play, inventory, {}, echo=lambda _: None)[0] == 0
    _, answers, _ = converge.run_converge_play(inventory, probe)
    assert answers["probe"]["here"]["drift"] == []


def test_a_failed_converge_forgets_the_hosts_digest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLAMAVM_STATE", str(tmp_path))
    inventory = tmp_path / "inv"
    converge._save_notes(inventory, {"a": "1", "b": "2"})
    converge.forget(inventory, ["a"])
    assert converge._notes(inventory) == {"b": "2"}


def test_a_host_this_controller_never_recorded_is_not_probed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLAMAVM_STATE", str(tmp_path))
    calls = []
    monkeypatch.setattr(converge, "run_converge_play", lambda *a, **k: calls.append(a))
    found = converge.plan(tmp_path / "inv", {}, {"a": {}}, {}, "/r")
    assert found.drift == {"a": ["no converge of it recorded by this controller"]}
    assert not calls and not found.all_up_to_date


def test_probe_answers_decide_up_to_date(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMAVM_STATE", str(tmp_path))
    monkeypatch.setenv("LLAMAVM_CACHE", str(tmp_path / "cache"))
    inventory = tmp_path / "inv"
    hostvars = {"a": {}, "b": {}, "c": {}}
    converge._save_notes(inventory, converge.digests({}, hostvars))
    answers = {"a": {"drift": [], "checked": 3}, "b": {"drift": ["x"], "checked": 3}}
    monkeypatch.setattr(converge, "run_converge_play", lambda *a, **k: (0, {"probe": answers}, ""))
    found = converge.plan(inventory, {}, hostvars, {}, "/r")
    assert found.up_to_date == {"a": 3}
    assert found.drift["b"] == ["x"]
    assert "unreachable" in found.drift["c"][0]
    full = converge.plan(inventory, {}, hostvars, {}, "/r", full=True)
    assert not full.up_to_date and set(full.drift) == set(hostvars)


def test_the_module_runs_with_the_hosts_python_alone() -> None:
    # What the module imports besides Ansible's module_utils must be the standard library.
    tree = ast.parse(MODULE.read_text())
    names = {
        (n.names[0].name if isinstance(n, ast.Import) else n.module or "").split(".")[0]
        for n in ast.walk(tree)
        if isinstance(n, ast.Import | ast.ImportFrom)
    }
    assert names <= {
        "__future__", "ansible", "hashlib", "json", "os", "platform", "shutil", "stat",
        "subprocess", "tempfile",
    }  # fmt: skip


# --- converging only the roles whose inputs changed -----------------------------------------


def test_a_role_runs_again_with_every_role_it_builds_on() -> None:
    assert converge.to_run({"model_services"}) == ["model_services", "expose"]
    assert converge.to_run({"llama_cpp"}) == ["llama_cpp", "model_services", "expose"]
    assert converge.to_run({"control"}) == ["control"]
    assert converge.to_run({"base"}) == list(converge.ROLES)
    assert converge.to_run(set()) == []


def _split(tmp_path: Path, extra: dict, hostvars: dict | None = None) -> converge.Digest:
    return converge.host_digests({"provision": extra}, hostvars or {"h": {}})["h"]


def test_each_role_digest_follows_only_what_that_role_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLAMAVM_CACHE", str(tmp_path / "cache"))
    archive = tmp_path / "src.tar"
    archive.write_bytes(b"one")
    contract = {"install": {"config_dir": "/etc/llamavm"}, "share_path": "/mnt/models",
                "models": [{"name": "a", "gguf_in_share": "a.gguf"}],
                "firewall": {"model_ports": [8001]}, "control": {"port": 8090},
                "default_model": "a"}  # fmt: skip
    extra = {"llamavm_contract": contract, "llama_cpp_source_archive": str(archive)}
    first = _split(tmp_path, extra)
    assert first == _split(tmp_path, extra)

    def changed(other: converge.Digest) -> set[str]:
        return {n for n in converge.ROLES if other.roles[n] != first.roles[n]}

    more = {
        **contract,
        "models": [*contract["models"], {"name": "b", "gguf_in_share": "b.gguf"}],
        "firewall": {"model_ports": [8001, 8002]},
    }
    added = _split(tmp_path, {**extra, "llamavm_contract": more})
    assert changed(added) == {"model_share", "model_services", "expose"}
    assert added.rest == first.rest and added.digest != first.digest
    control = _split(tmp_path, {**extra, "llamavm_contract": {**contract, "control": {}}})
    assert changed(control) == {"model_services", "control"}
    default = _split(tmp_path, {**extra, "llamavm_contract": {**contract, "default_model": "b"}})
    assert changed(default) == {"model_services"}
    archive.write_bytes(b"two")  # the same path, another source
    rebuilt = _split(tmp_path, extra)
    assert changed(rebuilt) == {"llama_cpp"} and rebuilt.rest == first.rest
    archive.write_bytes(b"one")
    unknown = _split(tmp_path, {**extra, "something_new": 1})
    assert unknown.rest != first.rest and not changed(unknown)  # counts for every role
    moved = _split(tmp_path, extra, {"h": {"ansible_host": "10.0.0.9"}})
    assert moved.rest != first.rest and not changed(moved)


def _provision_roles() -> list[dict]:
    import yaml

    plays = yaml.safe_load((REPO_ROOT / "ansible" / "playbooks" / "provision.yml").read_text())
    return [
        task
        for play in plays
        for task in play.get("tasks", [])
        if "ansible.builtin.include_role" in task
    ]


#: What `invoke provision` passes provision.yml (llamavm/ops/provision.py) besides role-named vars.
EXTRA_VARS = (
    "llamavm_contract",
    "llamavm_default_models",
    "llamavm_controller_share",
    "llamavm_host_package",
)


def test_the_role_map_covers_what_the_playbook_gives_each_role() -> None:
    """Each role the playbook includes is in converge.ROLES, may be skipped by name, and reads
    no extra variable the map does not give it: a skip is never stale."""
    import re

    tasks = _provision_roles()
    assert {t["ansible.builtin.include_role"]["name"] for t in tasks} == set(converge.ROLES)
    for task in tasks:
        name = task["ansible.builtin.include_role"]["name"]
        assert task["when"] == f"'{name}' not in __llamavm_skip"
        used = set(re.findall(r"\b(llamavm_[a-z_]+)", json.dumps(task.get("vars", {}))))
        reads = {r.partition(".")[0] for r in converge.ROLES[name].reads}
        assert used & set(EXTRA_VARS) <= reads, (name, used)
        if "llamavm_contract" in used and "llamavm_contract" not in converge.ROLES[name].reads:
            keys = set(re.findall(r"llamavm_contract\.([a-z_]+)", json.dumps(task["vars"])))
            keys |= {"models"} if "llamavm_contract.models" in json.dumps(task["vars"]) else set()
            assert keys <= {r.partition(".")[2] for r in converge.ROLES[name].reads}, name
        # The whole contract under the role's own name, but only some keys in the map: the
        # role may read only those keys of it.
        whole = [
            v for v, value in task.get("vars", {}).items() if value == "{{ llamavm_contract }}"
        ]
        picked = {r.partition(".")[2] for r in converge.ROLES[name].reads if "." in r}
        if whole and "llamavm_contract" not in converge.ROLES[name].reads:
            for var in whole:
                for path in (REPO_ROOT / "ansible" / "roles" / name).rglob("*"):
                    if not path.is_file() or path.parent.name in ("defaults", "meta"):
                        continue
                    text = path.read_text(errors="replace")
                    keys = set(re.findall(rf"\b{var}\.([a-z_]+)", text))
                    assert keys <= picked, (path, keys - picked)
                    assert not re.search(rf"\b{var}\s*(\||}}}})", text), (path, "whole contract")
    for path in (REPO_ROOT / "ansible" / "roles").rglob("*"):
        if path.is_file() and path.suffix in (".yml", ".j2", ".py"):
            text = path.read_text(errors="replace")
            assert not any(v in text for v in EXTRA_VARS), f"{path} reads an extra var itself"


def test_only_changed_roles_converge_when_the_probe_finds_no_drift(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLAMAVM_STATE", str(tmp_path))
    monkeypatch.setenv("LLAMAVM_CACHE", str(tmp_path / "cache"))
    inventory = tmp_path / "inv"
    hostvars = {"a": {}, "b": {}, "c": {}}
    old = {"provision": {"llamavm_contract": {"models": [1]}}}
    new = {"provision": {"llamavm_contract": {"models": [1, 2]}}}
    was = converge.host_digests(old, hostvars)
    notes = {h: {"digest": d.digest, "roles": d.roles, "rest": d.rest} for h, d in was.items()}
    converge._save_notes(inventory, notes)
    answers = {
        "a": {"drift": [], "checked": 3, "owned": True},
        "b": {"drift": ["/etc/x: deleted"], "checked": 3, "owned": True},
        "c": {"drift": [], "checked": 3, "owned": False},
    }
    asked = []

    def probe(_inv, per_host, **_):
        asked.append(per_host)
        return 0, {"probe": answers}, ""

    monkeypatch.setattr(converge, "run_converge_play", probe)
    found = converge.plan(inventory, new, hostvars, {}, "/r")
    assert {h: p["digest"] for h, p in asked[0].items()} == {h: d.digest for h, d in was.items()}
    run = ["model_share", "nfs_server", "model_services", "expose"]
    assert found.partial == {"a": run}
    assert found.skip_roles() == {"a": ["base", "gpu", "llama_cpp", "control"]}
    assert found.drift["a"][0].startswith("the inputs of model_share, model_services")
    assert found.drift["b"] == ["/etc/x: deleted"]  # drift: everything converges
    assert "predates per-role" in found.drift["c"][0]
    assert converge.repaired_lines(found, {"a": 3, "b": 1}) == [
        "llamavm: b: repaired (1 changes): /etc/x: deleted"
    ]
    moved = converge.plan(inventory, new, {**hostvars, "a": {"ansible_host": "x"}}, {}, "/r")
    assert moved.drift["a"] == ["what shapes its converge changed since the last one"]
    same = converge.plan(inventory, old, hostvars, {}, "/r")
    assert same.up_to_date == {"a": 3, "c": 3}
    assert same.skip_roles() == {"a": list(converge.ROLES), "c": list(converge.ROLES)}


def _recorded_pair(tmp_path: Path, unit_name: str, unit_role: str) -> tuple[Path, Path, dict]:
    """A record of a base-owned file and a unit owned by `unit_role`: (unit, base file, params)."""
    unit, base_conf = tmp_path / unit_name, tmp_path / "base.conf"
    unit.write_text("[Service]\n")
    base_conf.write_text("base\n")
    params = _params(
        tmp_path,
        files=[{"path": str(unit), "content": True}, {"path": str(base_conf), "content": True}],
        owners={"files": {str(unit): [unit_role], str(base_conf): ["base"]}},
    )
    mod.record(params)
    return unit, base_conf, params


def test_a_partial_record_keeps_the_skipped_roles_items(tmp_path: Path) -> None:
    _, base_conf, _ = _recorded_pair(tmp_path, "model.service", "model_services")
    other = tmp_path / "other.service"
    other.write_text("[Service]\n")
    again = _params(
        tmp_path,
        digest="d2",
        files=[{"path": str(other), "content": True}],
        owners={"files": {str(other): ["model_services"]}},
        keep_roles=["base"],
    )
    assert mod.record(again)["checked"] == 2  # base's file kept, the old unit gone with its role
    stored = json.loads((tmp_path / "state" / "converge.json").read_text())
    assert set(stored["files"]) == {str(base_conf), str(other)}
    assert stored["owners"]["files"] == {str(base_conf): ["base"], str(other): ["model_services"]}
    base_conf.write_text("edited\n")
    assert mod.verify(again)["drift"] == [f"{base_conf}: content changed"]
    (tmp_path / "state" / "converge.json").write_text(json.dumps({"digest": "d0"}))
    with pytest.raises(ValueError, match="no owners"):
        mod.record(again)


def test_the_callback_names_the_role_that_managed_each_item(tmp_path: Path) -> None:
    role = tmp_path / "roles" / "demo" / "tasks"
    role.mkdir(parents=True)
    work = tmp_path / "work"
    work.mkdir()
    role.joinpath("main.yml").write_text(
        f'- ansible.builtin.copy: {{content: "x\\n", dest: "{work}/by-role.conf", mode: "0644"}}\n'
    )
    play = tmp_path / "play.yml"
    play.write_text(
        "- hosts: all\n  gather_facts: false\n  tasks:\n"
        "    - ansible.builtin.include_role: {name: demo}\n"
        "    - ansible.builtin.copy:\n"
        f'        {{content: "y\\n", dest: "{work}/loose.conf", mode: "0644"}}\n'
    )
    inventory = tmp_path / "hosts.yml"
    inventory.write_text(
        "all:\n  hosts:\n    here:\n      ansible_connection: local\n"
        f"      ansible_python_interpreter: {sys.executable}\n      ansible_become: false\n"
    )
    observed = tmp_path / "observed.json"
    rc, _ = playbook.run_playbook(
        play,
        inventory,
        {},
        echo=lambda _: None,
        env={"LLAMAVM_OBSERVE": str(observed), "ANSIBLE_ROLES_PATH": str(tmp_path / "roles")},
    )
    assert rc == 0
    seen = json.loads(observed.read_text())["hosts"]["here"]
    owners = converge.owners(seen)
    assert owners["files"] == {f"{work}/by-role.conf": ["demo"], f"{work}/loose.conf": []}


def test_the_package_owners_survive_merging_the_vm_and_host_plays(tmp_path: Path) -> None:
    # A partial converge keeps a skipped role's packages by these owners: lost in the merge,
    # every package of base was dropped from the record by the next partial converge.
    vm, host = tmp_path / "vm.json", tmp_path / "provision.json"
    vm.write_text(
        json.dumps(
            {"hosts": {"h": {"packages": ["qemu"], "package_roles": {"qemu": ["hypervisor"]}}}}
        )
    )
    host.write_text(
        json.dumps(
            {
                "hosts": {
                    "h": {
                        "files": [{"path": "/etc/x", "content": True, "roles": ["base"]}],
                        "packages": ["curl", "qemu"],
                        "package_roles": {"curl": ["base"], "qemu": ["gpu"]},
                    }
                }
            }
        )
    )
    merged = provision._merge_observed(vm, host, tmp_path / "absent.json")["hosts"]["h"]
    assert merged["packages"] == ["qemu", "curl", "qemu"]
    assert converge.owners(merged)["packages"] == {"curl": ["base"], "qemu": ["gpu", "hypervisor"]}
    assert converge.owners(merged)["files"] == {"/etc/x": ["base"]}


def test_drift_names_the_roles_that_manage_it(tmp_path: Path) -> None:
    unit, base_conf, params = _recorded_pair(tmp_path, "control.service", "control")
    unit.write_text("[Service]\n# edited\n")
    assert mod.verify(params)["roles"] == ["control"]
    base_conf.unlink()
    assert mod.verify(params)["roles"] == ["base", "control"]
    record = json.loads(Path(params["path"]).read_text())
    found = mod.differences(record, {**mod.snapshot([], [], []), "files": {}})
    assert mod.drift_roles(record, found, ["a model unit differs"]) == [
        "base",
        "control",
        "model_services",
    ]
    moved = [(None, "kernel", "the host changed: kernel")]
    assert mod.drift_roles(record, moved, []) is None  # the host itself: every role
    assert mod.drift_roles({}, [("files", "/x", "")], []) is None  # no owners recorded


def test_drift_of_one_roles_items_converges_that_role(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLAMAVM_STATE", str(tmp_path))
    monkeypatch.setenv("LLAMAVM_CACHE", str(tmp_path / "cache"))
    inventory = tmp_path / "inv"
    hostvars = {"a": {}, "b": {}}
    now = converge.host_digests({}, hostvars)
    notes = {h: {"digest": d.digest, "roles": d.roles, "rest": d.rest} for h, d in now.items()}
    converge._save_notes(inventory, notes)
    answers = {
        "a": {"drift": ["/etc/x.service: content changed"], "checked": 3, "roles": ["control"]},
        "b": {"drift": ["the host changed: kernel"], "checked": 3, "roles": None},
    }
    monkeypatch.setattr(converge, "run_converge_play", lambda *a, **k: (0, {"probe": answers}, ""))
    found = converge.plan(inventory, {}, hostvars, {}, "/r")
    assert found.partial == {"a": ["control"]}
    assert found.skip_roles() == {"a": [n for n in converge.ROLES if n != "control"]}
    assert found.drift["b"] == ["the host changed: kernel"] and "b" not in found.partial
    lines: list[str] = []
    converge.report(found, lines.append)
    assert "llamavm: a: only the roles that manage what drifted run: control" in lines
    assert converge.repaired_lines(found, {"a": 1, "b": 0})[0].startswith("llamavm: a: repaired")


def test_a_vms_own_disk_counts_by_name_not_by_its_changing_content(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a hypervisor that is this machine, the VM's disk is here and changes as it runs."""
    monkeypatch.setenv("LLAMAVM_CACHE", str(tmp_path / "cache"))
    disk, seed_src = tmp_path / "vm.qcow2", tmp_path / "seed.iso"
    disk.write_bytes(b"running")
    seed_src.write_bytes(b"seed")
    vm = {"name": "v", "disk": str(disk), "seed": str(tmp_path / "v-seed.iso"),
          "base_disk": str(disk), "seed_src": str(seed_src),
          "offline_files": [{"src": str(seed_src), "dest": str(disk)}]}  # fmt: skip
    inputs = {"provision": {}, "vm": {"llamavm_vms": [vm]}}
    first = converge.digests(inputs, {"h": {}})
    disk.write_bytes(b"running, some blocks later")
    assert converge.digests(inputs, {"h": {}}) == first
    seed_src.write_bytes(b"another seed")  # an input: it counts
    assert converge.digests(inputs, {"h": {}}) != first

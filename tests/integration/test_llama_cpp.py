"""The llama_cpp role end to end: real builds, canary, web UI, idempotence, flip, rollback.

Two targets:

* ``LLAMAVM_LLAMA_CPP_TARGET=testbed`` (default): the role runs against the nspawn test bed
  (inventories/local, marker ``testbed``), where the model services later use the same build.
* ``LLAMAVM_LLAMA_CPP_TARGET=local``: the role runs with ``-c local`` against this machine
  into a scratch prefix (the build needs no systemd). Root only.

The first converge compiles llama-server (about 5 min with -j2 cold, far less with the
build user's ccache warm); the tests after it reuse that build and run in order.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from llamavm import REPO_ROOT
from llamavm.artifacts import source, tinymodel

VENV_BIN = Path(sys.executable).parent
TARGET = os.environ.get("LLAMAVM_LLAMA_CPP_TARGET", "testbed")
# Kept between sessions so the build user's ccache stays warm (local target).
LOCAL_BUILD_ROOT = Path(os.environ.get("LLAMAVM_IT_BUILD_ROOT", "/var/tmp/llamavm-it/build"))
# A flag that changes the build key but no compile command: the second build is all ccache hits.
# The run's own value keeps the test meaningful on a test bed that outlives a run: the key is
# new every run, so there is always a second build to make (all ccache hits).
FLAG_CHANGE = {
    "llama_cpp_cmake_extra_flags": {
        "LLAMA_FATAL_WARNINGS": "OFF",
        "LLAMAVM_TEST_RUN": uuid.uuid4().hex[:8],
    }
}

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="builds as a separate user: needs root"),
    pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake on this machine"),
]
if TARGET == "testbed":
    pytestmark.append(pytest.mark.testbed)


@dataclass
class Target:
    """Where the role runs, and how to run shell commands there."""

    prefix: str
    build_root: str
    inventory: list[str]
    ssh: list[str] = field(default_factory=list)
    base_vars: dict[str, object] = field(default_factory=dict)

    def sh(self, cmd: str, timeout: int = 120) -> subprocess.CompletedProcess[str]:
        # Over SSH the admin user runs the command as root, as the local target does.
        argv = (
            [*self.ssh, shlex.join(["sudo", "-n", "bash", "-c", cmd])]
            if self.ssh
            else ["bash", "-c", cmd]
        )
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)

    def readlink(self, name: str) -> str:
        return self.sh(f"readlink {shlex.quote(f'{self.prefix}/{name}')}").stdout.strip()

    def playbook(
        self, playbook: str, extra: dict[str, object] | None = None, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        env = {
            **os.environ,
            "ANSIBLE_CONFIG": str(REPO_ROOT / "ansible" / "ansible.cfg"),
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "ANSIBLE_FORCE_COLOR": "0",
        }
        with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="llamavm-it-") as fh:
            json.dump({**self.base_vars, **(extra or {})}, fh)
            fh.flush()
            argv = [
                str(VENV_BIN / "ansible-playbook"),
                *self.inventory,
                str(REPO_ROOT / "ansible" / "playbooks" / playbook),
                "-e",
                f"@{fh.name}",
            ]
            if check:
                argv.append("--check")
            return subprocess.run(
                argv,
                cwd=REPO_ROOT / "ansible",
                env=env,
                capture_output=True,
                text=True,
                check=False,
                timeout=3600,
            )


def recap_changed(out: str) -> int:
    """Total changed= over the PLAY RECAP lines."""
    return sum(int(n) for n in re.findall(r"changed=(\d+)", out.split("PLAY RECAP")[-1]))


def must_pass(proc: subprocess.CompletedProcess[str], what: str) -> str:
    if proc.returncode != 0:
        pytest.fail(f"{what} failed (rc {proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr}")
    return proc.stdout


@pytest.fixture(scope="module")
def archive() -> Path:
    """The tarball the controller ships (sdist tree + npm-built web UI)."""
    return source.prepare()


@pytest.fixture(scope="module")
def target(archive: Path, request: pytest.FixtureRequest) -> Iterator[Target]:
    common = {
        "llama_cpp_source_archive": str(archive),
        "llama_cpp_source_version": source.load_config().label,
        "llama_cpp_canary_model": str(tinymodel.canary()),
    }
    if TARGET == "testbed":
        info = request.getfixturevalue("testbed_info")
        yield Target(
            prefix="/opt/llama.cpp",
            build_root="/var/lib/llamabuild",
            inventory=["-i", str(REPO_ROOT / "inventories" / "local")],
            ssh=list(info.ssh_command),
            base_vars=common,
        )
        return
    scratch = Path(tempfile.mkdtemp(prefix="lvm-it-opt-"))
    scratch.chmod(0o755)  # the service-user checks must reach the prefix
    prefix = scratch / "llama.cpp"
    yield Target(
        prefix=str(prefix),
        build_root=str(LOCAL_BUILD_ROOT),
        inventory=["-c", "local", "-i", "localhost,"],
        base_vars={
            **common,
            "llama_cpp_prefix": str(prefix),
            "llama_cpp_build_root": str(LOCAL_BUILD_ROOT),
            "llama_cpp_hosts": "localhost",
            "llama_cpp_builder_hosts": "localhost",
            "ansible_python_interpreter": sys.executable,
            # This machine has no sudo: root "becomes" root with su.
            "ansible_become_method": "ansible.builtin.su",
        },
    )
    shutil.rmtree(scratch, ignore_errors=True)


@pytest.fixture(scope="module")
def first_build(target: Target) -> str:
    """The first converge; returns the build id current points at.

    On a test bed that already has this build (an earlier run, or `invoke provision`) the
    converge finds it and compiles nothing; either way `current` must point at it.
    """
    t0 = time.monotonic()
    out = must_pass(target.playbook("llama_cpp.yml"), "first converge")
    print(f"first converge: {time.monotonic() - t0:.0f} s")
    compiled = "Configure and compile as the build user" in out
    print(f"first converge compiled: {compiled}")
    build = target.readlink("current")
    assert build.startswith(source.load_config().label + "-cpu-"), build
    return build


def _copy_tree(dst: Path, top_exclude: tuple[str, ...]) -> Path:
    """Copy the cached sdist's llama.cpp tree without the given top-level entries."""
    cfg = source.load_config()
    src = source.cache_root() / "src" / f"llama_cpp_python-{cfg.version}" / cfg.tree
    shutil.copytree(
        src,
        dst,
        symlinks=True,
        ignore=lambda d, names: [n for n in names if Path(d) == src and n in top_exclude],
    )
    return dst


def _ccache_stats(target: Target) -> str:
    return target.sh(f"CCACHE_DIR={target.build_root}/ccache ccache --print-stats").stdout


def test_first_converge_installs_a_versioned_build(target: Target, first_build: str) -> None:
    d = f"{target.prefix}/{first_build}"
    info = json.loads(target.sh(f"cat {d}/BUILD-INFO.json").stdout)
    assert info["build_id"] == first_build
    assert info["key_inputs"]["flags"]["LLAMA_OPENSSL"] == "OFF"
    assert info["key_inputs"]["flags"]["GGML_CUDA"] == "OFF"
    # The host-side libraries compiled as unity builds, through the hook the role installed.
    hook = info["key_inputs"]["flags"]["CMAKE_PROJECT_INCLUDE"]
    assert "llama-common" in info["key_inputs"]["unity"]["targets"], info
    assert "if(TARGET llama-common)" in target.sh(f"cat {hook}").stdout
    assert info["version"].startswith("version:"), info
    # A native build needs what its builder's CPU has: the stamp declares it for artifacts.
    flags = target.sh("grep -m1 '^flags' /proc/cpuinfo").stdout.split()
    assert info["cpu_features"] and set(info["cpu_features"]) <= set(flags), info
    assert "avx2" in info["cpu_features"] or "avx2" not in flags
    assert "version" in target.sh(f"{d}/bin/llama-server --version 2>&1").stdout
    # Root-owned and read-only to everyone else, including the build user.
    st = target.sh(f"stat -c '%U %a' {d}/bin/llama-server {d}/bin/llama-fit-params {d}/lib")
    assert st.stdout.split("\n")[:3] == ["root 755", "root 755", "root 755"], st.stdout
    assert target.sh(f"find {d} -perm /022 -not -type l | head -1").stdout == ""
    assert target.sh(f"runuser -u llamabuild -- test -w {d}/bin/llama-server").returncode != 0


def test_rpath_resolves_libraries_from_the_install(target: Target, first_build: str) -> None:
    ldd = target.sh(f"ldd {target.prefix}/current/bin/llama-server").stdout
    assert "not found" not in ldd
    assert re.search(
        rf"libllama\.so\S* => {re.escape(target.prefix)}/current/bin/\.\./lib/", ldd
    ), ldd
    assert re.search(r"libggml\.so\S* => \S+/current/bin/\.\./lib/", ldd), ldd


def test_second_converge_changes_nothing_and_compiles_nothing(
    target: Target, first_build: str
) -> None:
    before = _ccache_stats(target)
    out = must_pass(target.playbook("llama_cpp.yml"), "second converge")
    assert recap_changed(out) == 0, out[-3000:]
    assert "Configure and compile" not in out
    assert _ccache_stats(target) == before  # no compiler ran through ccache


def test_web_ui_is_served_at_root(target: Target, first_build: str) -> None:
    from llamavm.artifacts import tinymodel

    model_local = Path(tempfile.mkdtemp(prefix="lvm-it-model-")) / "tiny.gguf"
    tinymodel.write(tinymodel.TinySpec(name="it-tiny"), model_local)
    model = "/tmp/lvm-it-tiny.gguf"
    if target.ssh:
        subprocess.run([*target.ssh, f"cat > {model}"], stdin=model_local.open("rb"), check=True)
    else:
        shutil.copy(model_local, model)
    port = 18093
    server = f"{target.prefix}/current/bin/llama-server"
    target.sh(
        f"(runuser -u nobody -- {server} -m {model} --host 127.0.0.1 --port {port} "
        f"-c 256 >/tmp/lvm-it-server.log 2>&1 & echo $! > /tmp/lvm-it-server.pid)"
    )
    try:
        html = ""
        for _ in range(60):
            r = target.sh(
                f"curl -s -o /dev/null -w '%{{http_code}}' http://127.0.0.1:{port}/health"
            )
            if r.stdout == "200":
                # No Accept-Encoding, as a health check or script sends.
                html = target.sh(f"curl -s http://127.0.0.1:{port}/").stdout
                break
            time.sleep(0.5)
        log = target.sh("tail -20 /tmp/lvm-it-server.log").stdout
        assert html, f"llama-server never became healthy:\n{log}"
        assert "<html" in html.lower() and "</html>" in html.lower(), html[:500]
        ctype = target.sh(f"curl -s -o /dev/null -w '%{{content_type}}' http://127.0.0.1:{port}/")
        assert ctype.stdout.startswith("text/html")
    finally:
        target.sh("kill $(cat /tmp/lvm-it-server.pid) 2>/dev/null; rm -f /tmp/lvm-it-server.pid")


def test_flag_change_makes_a_second_build_and_flips_current(
    target: Target, first_build: str
) -> None:
    t0 = time.monotonic()
    out = must_pass(target.playbook("llama_cpp.yml", FLAG_CHANGE), "converge with a new flag")
    print(f"ccache-warm rebuild converge: {time.monotonic() - t0:.0f} s")
    assert "Configure and compile as the build user" in out
    second = target.readlink("current")
    assert second != first_build
    assert target.readlink("previous") == first_build
    assert target.sh(f"test -x {target.prefix}/{first_build}/bin/llama-server").returncode == 0
    # ... and the same flags again are a no-op.
    again = must_pass(target.playbook("llama_cpp.yml", FLAG_CHANGE), "converge again")
    assert recap_changed(again) == 0, again[-3000:]


def test_rollback_flips_current_back_and_forth(target: Target, first_build: str) -> None:
    second = target.readlink("current")
    assert second != first_build, "run after the flag-change test"
    must_pass(target.playbook("rollback.yml"), "rollback")
    assert target.readlink("current") == first_build
    assert target.readlink("previous") == second
    must_pass(target.playbook("rollback.yml"), "roll forward")
    assert target.readlink("current") == second
    # Converging with the first build's flags flips back to it without compiling.
    out = must_pass(target.playbook("llama_cpp.yml"), "converge back to the first flags")
    assert "Configure and compile" not in out
    assert target.readlink("current") == first_build


SERVING_PID = (
    "systemctl show -p MainPID --value $(systemctl list-units --state=active "
    "--no-legend --plain 'llamavm-model-*' | cut -d' ' -f1 | head -1) 2>/dev/null"
)


def _converge_broken(target: Target, tree: Path) -> subprocess.CompletedProcess[str]:
    """Converge a broken source `tree`; it must fail and leave current, the stage and the
    serving model (on the test bed) as they were."""
    bad = source.prepare(tree=tree)
    before = target.readlink("current")
    pid_before = target.sh(SERVING_PID).stdout.strip()
    try:
        proc = target.playbook("llama_cpp.yml", {"llama_cpp_source_archive": str(bad)})
    finally:
        bad.unlink()
    assert proc.returncode != 0, proc.stdout[-3000:]
    assert target.readlink("current") == before
    assert target.sh(f"ls -d {target.prefix}/.stage-* 2>/dev/null").stdout.strip() == ""
    assert target.sh(SERVING_PID).stdout.strip() == pid_before
    return proc


def test_broken_source_fails_with_the_compiler_error_and_keeps_current(
    target: Target, first_build: str, tmp_path: Path
) -> None:
    tree = _copy_tree(tmp_path / "llama.cpp", (".git", "docs", "models", "media"))
    broken = tree / "src" / "llama-vocab.cpp"
    broken.write_text(broken.read_text() + "\nthis is not C++ llamavm_broken_marker;\n")
    proc = _converge_broken(target, tree)
    assert "llama-vocab.cpp" in proc.stdout and "error" in proc.stdout, proc.stdout[-4000:]
    assert "llamavm_broken_marker" in proc.stdout


def test_git_source_builds_from_a_pinned_ref(target: Target, first_build: str) -> None:
    """The git path against a local repository standing in for upstream (no internet)."""
    if target.ssh:
        pytest.skip("the stand-in repository lives on this machine")
    cfg = source.load_config()
    scratch = Path(tempfile.mkdtemp(prefix="lvm-it-git-"))
    scratch.chmod(0o755)  # the build user clones from here
    repo = _copy_tree(scratch / "llama.cpp.git-src", (".git", "docs", "models", "media"))
    # A fork that carries its prebuilt UI, as an air-gapped mirror would.
    shutil.copytree(source.build_ui(cfg, repo, source.cache_root()), repo / "tools/ui/dist")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "add", "-A", "-f"], check=True)
    subprocess.run([*git, "commit", "-qm", "stand-in"], check=True)
    subprocess.run([*git, "tag", "b0-test"], check=True)
    # git refuses to serve a repository owned by another user ("dubious ownership").
    subprocess.run(["chown", "-R", "llamabuild:llamabuild", str(repo)], check=True)
    git_vars = {
        "llama_cpp_source_type": "git",
        "llama_cpp_git_repo": f"file://{repo}",
        "llama_cpp_git_ref": "b0-test",
        "llama_cpp_source_version": "git-b0-test",
    }
    checked = target.playbook("llama_cpp.yml", git_vars, check=True)
    must_pass(checked, "check mode, git source")
    assert target.readlink("current") == first_build
    out = must_pass(target.playbook("llama_cpp.yml", git_vars), "git source build")
    assert "Check out the pinned git ref" in out
    assert target.readlink("current").startswith("git-b0-test-cpu-")
    # Leave the first build current for whoever runs next.
    must_pass(target.playbook("llama_cpp.yml"), "converge back")
    assert target.readlink("current") == first_build
    shutil.rmtree(scratch, ignore_errors=True)


def test_keep_builds_prunes_old_installs(target: Target, first_build: str) -> None:
    must_pass(target.playbook("llama_cpp.yml", {"llama_cpp_keep_builds": 1}), "prune to 1")
    left = target.sh(f"find {target.prefix} -mindepth 1 -maxdepth 1 -type d -printf '%f\\n'")
    kept = set(left.stdout.split())
    assert first_build in kept
    prev = target.readlink("previous")
    assert kept <= {first_build, prev}, kept
    assert target.sh(f"test -d {target.prefix}/previous/bin").returncode == 0


def test_fleet_artifact_is_installed_without_compiling(target: Target, first_build: str) -> None:
    """A host whose key has an artifact on the controller unpacks it instead of compiling,
    after checking the CPU features the artifact declares."""
    artifacts = Path(tempfile.mkdtemp(prefix="lvm-it-artifacts-"))
    # A "second host": same CPU, flags and source, but its own (empty) prefix.
    other = f"/tmp/lvm-it-opt2-{uuid.uuid4().hex[:8]}"
    target.sh(f"install -d -m 0755 {other}")
    try:
        published = must_pass(
            target.playbook("llama_cpp.yml", {"llama_cpp_artifact_dir": str(artifacts)}),
            "publish",
        )
        assert (artifacts / f"{first_build}.tar.gz").is_file(), published[-3000:]
        declared = json.loads((artifacts / f"{first_build}.json").read_text())
        assert declared["build_id"] == first_build and declared["cpu_features"]
        second = {"llama_cpp_artifact_dir": str(artifacts), "llama_cpp_prefix": other}
        before = _ccache_stats(target)
        out = must_pass(target.playbook("llama_cpp.yml", second), "install from artifact")
        assert "Unpack the artifact into the staging directory" in out
        assert "Configure and compile" not in out
        assert _ccache_stats(target) == before
        assert target.sh(f"readlink {other}/current").stdout.strip() == first_build
        ldd = target.sh(f"ldd {other}/current/bin/llama-server").stdout
        assert f"{other}/current/bin/../lib/libllama" in ldd, ldd
        again = must_pass(target.playbook("llama_cpp.yml", second), "artifact no-op")
        assert recap_changed(again) == 0, again[-3000:]
    finally:
        shutil.rmtree(artifacts, ignore_errors=True)
        target.sh(f"rm -rf {other}")


def test_an_artifact_needing_cpu_features_the_host_lacks_is_refused(
    target: Target, first_build: str
) -> None:
    artifacts = Path(tempfile.mkdtemp(prefix="lvm-it-artifacts-"))
    other = f"/tmp/lvm-it-opt3-{uuid.uuid4().hex[:8]}"
    target.sh(f"install -d -m 0755 {other}")
    try:
        must_pass(
            target.playbook("llama_cpp.yml", {"llama_cpp_artifact_dir": str(artifacts)}),
            "publish",
        )
        sidecar = artifacts / f"{first_build}.json"
        declared = json.loads(sidecar.read_text())
        declared["cpu_features"] = [*declared["cpu_features"], "avx512_llamavm_test"]
        sidecar.write_text(json.dumps(declared))
        proc = target.playbook(
            "llama_cpp.yml", {"llama_cpp_artifact_dir": str(artifacts), "llama_cpp_prefix": other}
        )
        assert proc.returncode != 0
        assert "needs the CPU features avx512_llamavm_test" in proc.stdout, proc.stdout[-3000:]
        assert target.sh(f"test -e {other}/current").returncode != 0
    finally:
        shutil.rmtree(artifacts, ignore_errors=True)
        target.sh(f"rm -rf {other}")


def test_staging_never_follows_links_the_build_user_planted(
    target: Target, first_build: str
) -> None:
    """The build tree belongs to the unprivileged build user; root copies nothing from it."""
    work = f"/tmp/lvm-it-stage-{uuid.uuid4().hex[:8]}"
    target.sh(
        f"install -d -o llamabuild -g llamabuild {work} {work}/build {work}/build/bin && "
        f"runuser -u llamabuild -- ln -s /etc/shadow {work}/build/bin/llama-server"
    )
    try:
        proc = target.sh(
            f"/usr/local/libexec/llamavm/llama-cpp-build stage {work}/build {work}/stage "
            "llama-server llamabuild"
        )
        assert proc.returncode != 0, proc.stdout
        assert "cannot read llama-server" in proc.stderr, proc.stderr
        leaked = target.sh(f"grep -c root: {work}/stage/bin/llama-server 2>/dev/null").stdout
        assert leaked.strip() in ("", "0"), "root copied /etc/shadow into the stage"
        planted = f"ln -sf /etc/shadow {work}/build/bin/libggml.so"
        target.sh(f"runuser -u llamabuild -- {planted}")
        target.sh(f"runuser -u llamabuild -- sh -c 'echo x > {work}/build/bin/llama-server.real'")
        proc = target.sh(
            f"runuser -u llamabuild -- rm {work}/build/bin/llama-server && "
            f"runuser -u llamabuild -- cp /bin/true {work}/build/bin/llama-server && "
            f"/usr/local/libexec/llamavm/llama-cpp-build stage {work}/build {work}/stage "
            "llama-server llamabuild"
        )
        assert proc.returncode != 0
        assert "links outside the build" in proc.stderr, proc.stderr
    finally:
        target.sh(f"rm -rf {work}")


def _trap_on_first_computation(tree: Path) -> None:
    """Make every graph computation die with SIGILL, as a build with CPU flags the host lacks
    does: --version and --list-devices still work, the first token never comes."""
    cpu = tree / "ggml" / "src" / "ggml-cpu" / "ggml-cpu.c"
    text = cpu.read_text()
    head = (
        "enum ggml_status ggml_graph_compute(struct ggml_cgraph * cgraph, "
        "struct ggml_cplan * cplan) {"
    )
    assert head in text, "ggml_graph_compute moved: update this test"
    cpu.write_text(text.replace(head, head + "\n    __builtin_trap();", 1))


def test_a_build_that_dies_on_its_first_computation_never_goes_live(
    target: Target, first_build: str, tmp_path: Path
) -> None:
    tree = _copy_tree(tmp_path / "llama.cpp", (".git", "docs", "models", "media"))
    _trap_on_first_computation(tree)
    out = _converge_broken(target, tree).stdout
    assert "Canary - llama-server --version" in out  # the old canary passed ...
    assert "canary failed: llama-server died with signal 4 (ILL)" in out, out[-4000:]

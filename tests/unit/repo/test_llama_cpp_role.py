"""Static checks of the llama_cpp role (no hosts): interface in sync, playbooks parse."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llamavm import REPO_ROOT
from llamavm.artifacts import source

ROLE = REPO_ROOT / "ansible" / "roles" / "llama_cpp"
VENV_BIN = Path(sys.executable).parent


def _defaults() -> dict[str, object]:
    return yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())


def _spec(entry: str = "main") -> dict[str, dict[str, object]]:
    specs = yaml.safe_load((ROLE / "meta" / "argument_specs.yml").read_text())
    return specs["argument_specs"][entry]["options"]


def test_defaults_agree_with_the_controller_pins() -> None:
    cfg = source.load_config()
    pins = yaml.safe_load((REPO_ROOT / "config" / "llama_cpp.yaml").read_text())
    defaults = _defaults()
    assert defaults["llama_cpp_source_version"] == cfg.label
    assert defaults["llama_cpp_git_repo"] == pins["git"]["repo"]
    assert defaults["llama_cpp_git_ref"] == pins["git"]["ref"]
    assert defaults["llama_cpp_keep_builds"] == pins["keep_builds"]


@pytest.mark.parametrize("playbook", ["llama_cpp.yml", "rollback.yml", "provision.yml", "vm.yml"])
def test_playbook_syntax(playbook: str) -> None:
    env = {**os.environ, "ANSIBLE_CONFIG": str(REPO_ROOT / "ansible" / "ansible.cfg")}
    proc = subprocess.run(
        [
            str(VENV_BIN / "ansible-playbook"),
            "--syntax-check",
            "-i",
            "localhost,",
            str(REPO_ROOT / "ansible" / "playbooks" / playbook),
        ],
        cwd=REPO_ROOT / "ansible",
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _render(template: str, **overrides: object) -> str:
    from ansible.parsing.dataloader import DataLoader
    from ansible.template import Templar, trust_as_template

    variables = {
        **_defaults(),
        **yaml.safe_load((ROLE / "vars" / "main.yml").read_text()),
        "ansible_managed": "managed",
        **overrides,
    }
    text = (ROLE / "templates" / "usr" / "local" / "libexec" / "llamavm" / template).read_text()
    return str(Templar(loader=DataLoader(), variables=variables).template(trust_as_template(text)))


def test_the_unity_hook_batches_the_targets_and_keeps_the_excluded_sources_alone() -> None:
    hook = _render("llama-cpp-unity.cmake.j2", llama_cpp_unity_targets=["llama-common", "mtmd"])
    assert "# managed\n" in hook
    assert "cmake_language(DEFER DIRECTORY" in hook  # after every add_subdirectory
    for target in ("llama-common", "mtmd"):
        assert f"if(TARGET {target})" in hook  # a target this llama.cpp lacks is left alone
        assert f"set_target_properties({target} PROPERTIES\n      UNITY_BUILD ON" in hook
        for path in _defaults()["llama_cpp_unity_exclude"]:  # type: ignore[union-attr]
            assert f'"${{CMAKE_SOURCE_DIR}}/{path}"\n        TARGET_DIRECTORY {target}' in hook
    assert "UNITY_BUILD_BATCH_SIZE 8" in hook
    assert "server-context" not in hook


@pytest.mark.parametrize(
    ("failed", "hint"),
    [
        ("common/CMakeFiles/llama-common.dir/Unity/unity_3_cxx.cxx.o", True),
        # upstream's own unity batches (libllama's models) and plain sources: no such hint
        ("src/CMakeFiles/llama.dir/Unity/unity_0_cxx.cxx.o", False),
        ("common/CMakeFiles/llama-common.dir/json.cpp.o", False),
    ],
)
def test_a_build_failing_in_a_unity_batch_says_how_to_build_without_it(
    tmp_path: Path, failed: str, hint: bool
) -> None:
    helper = tmp_path / "llama-cpp-build"
    helper.write_text(_render("llama-cpp-build.j2"))
    helper.chmod(0o755)
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "cmake").write_text(
        "#!/bin/sh\n"
        '[ "$1" = --build ] || exit 0\n'
        "echo 'x.cxx:1:1: error: redefinition of thing'\n"
        f"echo 'gmake[3]: *** [{failed}] Error 1'\n"
        "exit 2\n"
    )
    (fake / "cmake").chmod(0o755)
    env = {
        "PATH": f"{fake}:/usr/bin:/bin",
        "LLAMA_CPP_UNITY_TARGETS": "llama-common mtmd server-context llama-server-impl",
    }
    proc = subprocess.run(
        [str(helper), "build", str(tmp_path / "src"), str(tmp_path / "b"), "2", "llama-server"],
        env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "llama-cpp-build: cmake --build failed" in proc.stderr
    said = "llama-common failed as a unity build" in proc.stderr
    assert said == hint, proc.stderr
    if hint:
        assert "llama_cpp_unity_exclude" in proc.stderr and "llama_cpp_unity_build: false" in (
            proc.stderr
        )


def test_every_build_compiles_in_the_one_tree_kept_only_for_its_own_build(tmp_path: Path) -> None:
    # The unity batches name each source by its absolute path: a tree per build key made every
    # other key's rebuild miss ccache there. One tree, replaced for another build.
    helper = tmp_path / "llama-cpp-build"
    helper.write_text(_render("llama-cpp-build.j2"))
    helper.chmod(0o755)
    src = tmp_path / "llama.cpp-1"
    src.mkdir()
    (src / "CMakeLists.txt").write_text("project(x)\n")
    archive = tmp_path / "src.tar.gz"
    subprocess.run(["tar", "-czf", archive, "-C", tmp_path, src.name], check=True)
    tree = tmp_path / "work" / "tree"

    def unpack(build_id: str) -> str:
        proc = subprocess.run(
            [helper, "unpack", archive, tree, build_id], capture_output=True, text=True, check=True
        )
        return proc.stdout

    assert "unpacked a-1" in unpack("a-1")
    assert (tree / "src" / "CMakeLists.txt").exists()
    assert (tree / "build-id").read_text() == "a-1\n"
    (tree / "build").mkdir()
    (tree / "build" / "CMakeCache.txt").write_text("FLAG=old\n")
    assert "kept the tree of a-1" in unpack("a-1")  # a retry goes on where it stopped
    assert (tree / "build" / "CMakeCache.txt").exists()
    assert "unpacked b-2" in unpack("b-2")  # another build: no stale CMake cache
    assert not (tree / "build").exists()
    assert (tree / "build-id").read_text() == "b-2\n"
    bad = subprocess.run([helper, "unpack", archive, tree, "../x"], capture_output=True, text=True)
    assert bad.returncode != 0 and "bad build id" in bad.stderr

"""testinfra checks of the llama_cpp role installed as a fleet host installs: from the artifact
the test bed's own build published, into a second prefix, nothing compiled, canaried."""

from __future__ import annotations

import json

PREFIX = "/opt/llama.cpp-molecule"
MAIN = "/opt/llama.cpp"


def _stamp(host, prefix: str) -> dict:
    return json.loads(host.file(f"{prefix}/current/BUILD-INFO.json").content_string)


def test_current_points_at_the_artifact_of_the_main_build(host) -> None:
    current = host.file(f"{PREFIX}/current")
    assert current.is_symlink
    stamp = _stamp(host, PREFIX)
    assert stamp["built_by"] == "artifact"
    assert current.linked_to == f"{PREFIX}/{stamp['build_id']}"
    main = _stamp(host, MAIN)
    assert stamp["key"] == main["key"] and stamp["build_id"] == main["build_id"]
    assert sorted(stamp["cpu_features"]) == sorted(main["cpu_features"])


def test_the_install_is_root_owned_and_not_writable_by_others(host) -> None:
    for path in (PREFIX, f"{PREFIX}/current/bin", f"{PREFIX}/current/bin/llama-server"):
        item = host.file(path)
        assert item.user == "root" and item.group == "root", path
        assert not item.mode & 0o022, f"{path} mode {item.mode:o}"


def test_the_installed_server_runs_with_its_own_libraries(host) -> None:
    server = f"{PREFIX}/current/bin/llama-server"
    version = host.run(f"{server} --version")
    assert version.rc == 0, version.stderr
    assert "version" in (version.stdout + version.stderr)
    libraries = host.check_output(f"ldd {server}")
    assert "not found" not in libraries
    ggml = [line for line in libraries.splitlines() if "libggml" in line or "libllama" in line]
    assert ggml and all(PREFIX in line for line in ggml), libraries


def test_it_loads_a_model_and_computes_unprivileged(host) -> None:
    """The installed build (not only --version) serves the canary model and produces tokens,
    as the unprivileged build user, through the role's own helper."""
    run = host.run(
        "runuser -u llamabuild -- /usr/local/libexec/llamavm/llama-cpp-build canary "
        f"{PREFIX}/current /var/lib/llamabuild/canary.gguf 60"
    )
    assert run.rc == 0, run.stderr

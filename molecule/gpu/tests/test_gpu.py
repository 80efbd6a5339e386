"""testinfra checks of the gpu role on the test bed, a container: the plan says why nothing is
installed, and nothing NVIDIA is."""

from __future__ import annotations

import json


def test_the_plan_is_recorded_and_says_why_nothing_is_installed(host) -> None:
    plan_file = host.file("/etc/llamavm/gpu.json")
    assert plan_file.mode == 0o644 and plan_file.user == "root"
    plan = json.loads(plan_file.content_string)
    assert (plan["platform"], plan["action"]) == ("container", "none")
    assert "host's driver" in plan["why"]
    assert plan["packages"] == [] and plan["driver_packages"] == []


def test_no_nvidia_package_or_repository_was_added(host) -> None:
    listed = host.run("dpkg-query -W -f '${Package}\\n' 'nvidia-*' 'cuda-*' 2>/dev/null")
    assert listed.stdout.strip() == ""
    assert not host.file("/etc/apt/sources.list.d/cuda.sources").exists
    assert not host.file("/etc/modprobe.d/llamavm-blacklist-nouveau.conf").exists

"""The container engine's client for one Compose project: its own CLI (`docker` or `podman`,
and `docker compose`, `docker-compose` or `podman compose`), locally or through DOCKER_HOST
(`ssh://user@gpu-box`) — the project's containers as the engine reports them, a model's
/health asked over HTTP, its logs, and the build of the project's image."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamavm.errors import LlamavmError
from llamavm.inputs import catalog as catalog_mod
from llamavm.platforms.compose.render import LABEL, PROJECT
from llamavm.platforms.compose.site import Site


@dataclass(frozen=True)
class Container:
    model: str
    kind: str
    status: str  # created, running, restarting, exited, ...
    health: str  # healthy, starting, unhealthy, "" (no healthcheck result yet)
    started_at: str
    exit_code: int
    image: str
    restarts: int = 0


class Engine:
    """The container engine's CLI for one project folder."""

    def __init__(self, site: Site, folder: Path | None = None) -> None:
        self.site = site
        self.dir = folder or site.dir
        self.env = {**os.environ}
        if site.engine_host:
            self.env["DOCKER_HOST"] = site.engine_host
            self.env["CONTAINER_HOST"] = site.engine_host
        cli = site.engine
        if cli == "auto":
            cli = "docker" if shutil.which("docker") else "podman"
        if not shutil.which(cli):
            raise LlamavmError(
                f"{site.inventory}: no {cli} CLI on this machine — install docker.io (or podman) "
                "and its compose, or set llamavm_compose_engine",
                code=2,
            )
        self.cli = cli
        self._compose: list[str] | None = None

    def compose_cli(self) -> list[str]:
        if self._compose is None:
            plugin = subprocess.run([self.cli, "compose", "version"], capture_output=True,
                                    env=self.env, check=False)  # fmt: skip
            if plugin.returncode == 0:
                self._compose = [self.cli, "compose"]
            elif shutil.which("docker-compose"):
                self._compose = ["docker-compose"]
            elif shutil.which("podman-compose"):
                self._compose = ["podman-compose"]
            else:
                raise LlamavmError(
                    f"{self.site.inventory}: no compose for {self.cli} here — install "
                    "docker-compose (Debian) or the compose plugin",
                    code=2,
                )
        return self._compose

    def run(self, args: list[str], *, timeout: float = 600,
            check: bool = True) -> subprocess.CompletedProcess[str]:  # fmt: skip
        # The project folder is the compose commands' directory; the engine's own commands
        # (ps, inspect, logs) run wherever, so a project not rendered yet is no error for them.
        cwd = self.dir if self.dir.is_dir() else None
        try:
            done = subprocess.run(args, capture_output=True, text=True, env=self.env,
                                  cwd=cwd, timeout=timeout, check=False)  # fmt: skip
        except subprocess.TimeoutExpired:
            raise LlamavmError(f"{' '.join(args[:4])} took over {timeout:.0f} s") from None
        except OSError as exc:
            raise LlamavmError(f"cannot run {args[0]}: {exc.strerror}") from None
        if check and done.returncode != 0:
            said = (done.stderr or done.stdout).strip().splitlines()
            raise LlamavmError(
                f"{' '.join(args[:3])} failed (exit {done.returncode}): "
                f"{said[-1] if said else 'no output'}",
                detail="\n".join(said[-15:-1]),
            )
        return done

    def compose(self, profiles: list[str], args: list[str], **kwargs: Any) -> Any:
        base = [*self.compose_cli(), "-p", PROJECT, "-f", str(self.dir / "compose.yaml")]
        for profile in profiles:
            base += ["--profile", profile]
        return self.run([*base, *args], **kwargs)

    def containers(self) -> dict[str, Container]:
        listed = self.run([self.cli, "ps", "-aq", "--filter", f"label={LABEL}.model"]).stdout
        ids = listed.split()
        if not ids:
            return {}
        found = self.run([self.cli, "inspect", *ids], check=False)
        out: dict[str, Container] = {}
        for item in json.loads(found.stdout or "[]"):
            labels = (item.get("Config") or {}).get("Labels") or {}
            state = item.get("State") or {}
            health = state.get("Health") or state.get("Healthcheck") or {}
            name = labels.get(f"{LABEL}.model", "")
            out[name] = Container(
                model=name,
                kind=labels.get(f"{LABEL}.kind", "big"),
                status=str(state.get("Status", "")),
                health=str(health.get("Status", "")),
                started_at=str(state.get("StartedAt", "")),
                exit_code=int(state.get("ExitCode", 0) or 0),
                image=str(item.get("Image", "")),
                restarts=int(item.get("RestartCount", 0) or 0),
            )
        return out

    def image_id(self, image: str) -> str | None:
        """The image's ID; None when the engine has no such image (an engine that does not
        answer is an error, not a missing image)."""
        done = self.run([self.cli, "image", "inspect", "--format", "{{.Id}}", image], check=False)
        if done.returncode == 0:
            return done.stdout.strip() or None
        said = (done.stderr or done.stdout).strip()
        if re.search(r"no such image|image not known|not found", said, re.IGNORECASE):
            return None
        lines = said.splitlines()
        raise LlamavmError(
            f"{self.cli} does not answer ({lines[-1] if lines else f'exit {done.returncode}'}) — "
            "start the engine, or check llamavm_compose_engine_host"
        )

    def logs(self, model: str, lines: int = 20) -> str:
        done = self.run([self.cli, "logs", "--tail", str(lines), f"{PROJECT}-{model}"],
                        check=False)  # fmt: skip
        return (done.stdout + done.stderr).strip()


def health(site: Site, port: int, timeout: float = 1.0) -> int | None:
    """The HTTP status of the model's /health on `port`; None when nothing answers."""
    url = f"http://{site.probe_host}:{port}/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (OSError, ValueError):
        return None


def running(found: dict[str, Container]) -> list[str]:
    """The big models whose containers run (or restart), by name."""
    return sorted(n for n, c in found.items() if c.kind == "big" and c.status in
                  ("running", "restarting"))  # fmt: skip


def build(engine: Engine, cat: catalog_mod.Catalog, image: str,
          say: Callable[[str], None] = print) -> bool:  # fmt: skip
    """Build the project's image (once: every service shares it); True if it is new."""
    before = engine.image_id(image)
    if before is not None:
        return False
    say(f"llamavm: building {image} (llama.cpp from source: minutes)")
    engine.compose([cat.default.name], ["build", cat.default.name], timeout=7200)
    if engine.image_id(image) is None:
        raise LlamavmError(f"the build finished but {image} is not on the engine")
    return True

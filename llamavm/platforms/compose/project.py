"""A Compose project converged and reached from the controller: `invoke provision` renders it,
builds its images, creates the model containers from the current project and starts switchd
(which serves the chosen model); `invoke switch/stop/status -i <compose inventory>` run
`llamavm-switch` in the switchd container (`docker exec`) exactly as they run it over SSH on a
systemd host — the same transaction, the same answers. Nothing here switches models itself."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import replace

from llamavm.errors import LlamavmError
from llamavm.inputs import catalog as catalog_mod
from llamavm.ops import remote
from llamavm.platforms.compose import engine as engine_mod
from llamavm.platforms.compose import frontdoor, switchd
from llamavm.platforms.compose.engine import Engine
from llamavm.platforms.compose.render import render


def exec_prefix(engine: Engine) -> tuple[str, ...]:
    """How a command runs in the switchd container, from this machine (the engine may be
    elsewhere: DOCKER_HOST)."""
    env = [f"{k}={engine.env[k]}" for k in ("DOCKER_HOST", "CONTAINER_HOST") if k in engine.env]
    return (*(["env", *env] if env else []), engine.cli, "exec", "-i", switchd.CONTAINER)


def target(engine: Engine, host: remote.Host, *, must_run: bool = True) -> remote.Host:
    """The inventory's host, reached through the switchd container instead of SSH (the
    control API, where the command uses it, at the host's address as on a systemd host)."""
    if must_run:
        found = engine.run([engine.cli, "inspect", "--format", "{{.State.Status}}",
                            switchd.CONTAINER], check=False)  # fmt: skip
        said = found.stderr.strip().splitlines()
        if found.returncode != 0 and not re.search(r"no such (object|container)", found.stderr,
                                                   re.IGNORECASE):  # fmt: skip
            raise LlamavmError(
                f"{host.name}: {engine.cli} does not answer ({said[-1] if said else 'no output'})"
                " — start the engine, or check llamavm_compose_engine_host",
                code=2,
            )
        state = found.stdout.strip() or "absent"
        if state != "running":
            raise LlamavmError(
                f"{host.name}: the project's {switchd.CONTAINER} container does not run "
                f"({state}) — run invoke provision -i {engine.site.inventory}",
                code=2,
            )
    return replace(host, via=exec_prefix(engine), key_file=switchd.SWITCHD_KEY)


def _ids(engine: Engine) -> dict[str, str]:
    """Container ID by name, of every container of the project (models and switchd)."""
    done = engine.run([engine.cli, "ps", "-a", "--filter", "label=com.docker.compose.project="
                       "llamavm", "--format", "{{.ID}} {{.Names}}"])  # fmt: skip
    return {name: cid for cid, name in (line.split() for line in done.stdout.splitlines())}


def restart_control(engine: Engine, cat: catalog_mod.Catalog) -> None:
    """The control service started again (it reads the key at its start, as on a host: a key
    rotation restarts it). switchd cannot: its engine calls reach the model containers only."""
    if cat.settings.control.enabled:
        engine.run([engine.cli, "restart", switchd.CONTROL_CONTAINER], timeout=120)


def build_switchd(engine: Engine, image: str, say: Callable[[str], None]) -> bool:
    """Build switchd's image (seconds: the model image with the host package); True if new."""
    if engine.image_id(image) is not None:
        return False
    say(f"llamavm: building {image} (the host package on the model image)")
    engine.compose([], ["build", switchd.SERVICE], timeout=1800)
    if engine.image_id(image) is None:
        raise LlamavmError(f"the build finished but {image} is not on the engine")
    return True


def provision(cat: catalog_mod.Catalog, engine: Engine, host: remote.Host,
              say: Callable[[str], None] = print) -> list[str]:  # fmt: skip
    """Converge the project; what changed, in words ([] for nothing)."""
    rendered = render(cat, engine.site, engine.dir)
    done = [f"rendered {', '.join(rendered.changed)}"] if rendered.changed else []
    if engine_mod.build(engine, cat, rendered.image, say=say):
        done.append(f"built {rendered.image}")
    if build_switchd(engine, rendered.switchd_image, say):
        done.append(f"built {rendered.switchd_image}")
    before = _ids(engine)
    serving = engine_mod.running(engine.containers())
    # Every model's container made from the current project (Compose leaves an unchanged one
    # as it is), those of models the catalog no longer has removed; they are started and
    # stopped by switchd alone.
    names = [m.name for m in cat.models]
    engine.compose(names, ["up", "--no-start", "--no-build", "--remove-orphans", *names],
                   timeout=600)  # fmt: skip
    services = [switchd.SERVICE] + ([switchd.CONTROL] if cat.settings.control.enabled else [])
    services += [frontdoor.SERVICE] if frontdoor.enabled(cat) else []
    services += [switchd.METRICS] if cat.settings.expose.metrics else []
    engine.compose([], ["up", "-d", "--no-build", *services], timeout=600)
    after = _ids(engine)
    made = sorted(n for n, cid in after.items() if before.get(n) != cid)
    if made:
        done.append(f"created {', '.join(made)}")
    gone = sorted(set(before) - set(after))
    if gone:
        done.append(f"removed {', '.join(gone)} (no longer in the catalog)")
    host = target(engine, host)
    # A serving model whose container was made again was stopped by that: serve it again.
    still = engine_mod.running(engine.containers())
    big = {m.name for m in cat.big}
    again = [n for n in serving if n not in still and n in big]
    if again:
        code, answer = remote.transaction(host, "switch", again[:1], stream=True)
        if code:
            raise LlamavmError(f"{host.name}: {answer.get('error')}", code=code,
                               detail=answer.get("journal") or "")  # fmt: skip
        done.append(f"restarted {again[0]} from the new project")
    answer = remote.query(host, ["boot"])
    if not answer.get("ok"):
        raise LlamavmError(f"{host.name}: {answer.get('error')}", code=int(answer.get("code", 1)),
                           detail=answer.get("journal") or "")  # fmt: skip
    now = engine_mod.running(engine.containers())
    if now and now != serving and not again:  # switchd's own start may have served it first
        done.append(f"started {now[0]}")
    elif answer.get("why") == "stopped by the operator":
        say("llamavm: no model serves (stopped by invoke stop): left stopped")
    return done

"""The Compose switch transaction, run on the controller with the engine's CLI (engine.py): the
same semantics as a systemd host's — checks first, stop the old, start the new, a health gate, a
roll back to the old model on failure — under a lock in the project folder, with the outcome in
its `.state.json`; `stop`, `status`, and `provision` (render, build, serve the default) beside
it. A later issue runs the host's own transaction over a runtime seam instead: this module goes
then, in one piece."""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

from llamavm import REPO_ROOT
from llamavm.errors import LlamavmError
from llamavm.host import EXIT_LOCK, store
from llamavm.host.contract import HostError
from llamavm.inputs import catalog as catalog_mod
from llamavm.platforms.compose import engine as engine_mod
from llamavm.platforms.compose.engine import Engine
from llamavm.platforms.compose.render import PROJECT, render
from llamavm.platforms.compose.site import site


def _project(folder: Path) -> dict[str, Any]:
    path = folder / "compose.yaml"
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LlamavmError(
            f"{path}: no compose project here — run invoke provision (or compose.render) first",
            code=2,
        ) from None
    return doc if isinstance(doc, dict) else {}


@contextlib.contextmanager
def _lock(folder: Path, timeout: float) -> Iterator[None]:
    """One switch at a time on this project: the host package's own switch lock (an flock on
    a root-only file), in the project folder."""
    try:
        with store.locked(folder / ".lock" / "switch.lock", timeout):
            yield
    except HostError as exc:
        if exc.code != EXIT_LOCK:
            raise LlamavmError(str(exc)) from None
        raise LlamavmError(
            f"another switch of {folder} held its lock for over {timeout:.0f} s — wait for it, "
            "or see invoke status",
            code=EXIT_LOCK,
        ) from None


def _state(folder: Path) -> dict[str, Any]:
    try:
        data = store.read_json(folder / ".state.json")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _save_state(folder: Path, **values: Any) -> None:
    store.write_json(folder / ".state.json", {**_state(folder), **values})


def _gate(engine: Engine, model: catalog_mod.Model) -> str | None:
    """Wait until `model` answers /health with 200 (None) or its container gives up (why)."""
    deadline = time.monotonic() + model.health_timeout_s
    restarts = None
    while time.monotonic() < deadline:
        found = engine.containers().get(model.name)
        if found is None:
            return "its container is gone"
        # A restart count from before this start (kept by some engines) is not this start's.
        restarts = found.restarts if restarts is None else restarts
        if found.status in ("exited", "dead"):
            return f"its container exited (status {found.exit_code})"
        if found.restarts > restarts:
            return f"llama-server exited (status {found.exit_code}) and its container restarts"
        if found.health == "unhealthy":
            return "its container's healthcheck says unhealthy"
        if found.status == "running" and (
            found.health == "healthy" or engine_mod.health(engine.site, model.port) == 200
        ):
            return None
        time.sleep(0.25)
    return f"no healthy /health within {model.health_timeout_s} s"


def checks(cat: catalog_mod.Catalog, engine: Engine, model: catalog_mod.Model) -> str:
    """Refuse what cannot work before anything is stopped; the image the project uses."""
    if model.companion:
        raise LlamavmError(
            f"{model.name} is a companion (it runs beside a big model): start it with "
            f"{' '.join(engine.compose_cli())} -p {PROJECT} --profile {model.name} up -d",
            code=2,
        )
    doc = _project(engine.dir)
    service = (doc.get("services") or {}).get(model.name)
    if not isinstance(service, dict):
        raise LlamavmError(
            f"{engine.dir / 'compose.yaml'}: no service {model.name!r} — the project is older "
            "than the catalog: run invoke provision (or compose.render) again",
            code=2,
        )
    if not engine.site.engine_host:
        gguf = Path(engine.site.models_dir) / model.gguf
        if not gguf.is_file():
            raise LlamavmError(
                f"{model.name}: {gguf} is not there — put the GGUF in llamavm_compose_models_dir "
                f"({engine.site.models_dir}) or fix the catalog's gguf",
                code=2,
            )
    image = str(service.get("image", ""))
    if engine.image_id(image) is None:
        raise LlamavmError(
            f"{model.name}: the image {image} is not built on this engine — run invoke provision "
            f"-i {engine.site.inventory} (it builds it)",
            code=2,
        )
    return image


def _start(engine: Engine, model: catalog_mod.Model) -> None:
    engine.compose([model.name], ["up", "-d", "--no-deps", "--no-build", model.name])


def _stop(engine: Engine, names: list[str]) -> None:
    if names:
        engine.compose(names, ["stop", *names])


def switch(cat: catalog_mod.Catalog, engine: Engine, name: str, *, lock_timeout: float = 900,
           say: Callable[[str], None] = lambda _: None,
           restart: bool = False) -> dict[str, Any]:  # fmt: skip
    """Serve `name`: checks, stop the old, start the new, health gate, roll back on failure.
    `restart`: even when it serves already (a new image: its container is made again)."""
    began = time.monotonic()
    model = cat.resolve(name)
    checks(cat, engine, model)
    with _lock(engine.dir, lock_timeout):
        found = engine.containers()
        running = engine_mod.running(found)
        if running == [model.name] and not restart and _gate_now(engine, model):
            _save_state(engine.dir, active=model.name, stopped_by_operator=False)
            return {"ok": True, "changed": False, "active": model.name, "stopped": []}
        old = [n for n in running if n != model.name]
        say(f"llamavm: stopping {', '.join(old) or 'nothing'}, starting {model.name}")
        stopped_at = time.monotonic()
        _stop(engine, running)
        loading = time.monotonic()
        try:
            _start(engine, model)
            why = _gate(engine, model)
        except LlamavmError as exc:  # the engine refused or went away half-way
            why = f"it did not start ({exc})"
        if why is not None:
            journal = engine.logs(model.name)
            with contextlib.suppress(LlamavmError):
                _stop(engine, [model.name])
            back = _rollback(cat, engine, old)
            raise LlamavmError(
                f"{model.name} did not become healthy: {why}; {back}", code=1, detail=journal
            )
        loaded = time.monotonic()
        now = engine_mod.running(engine.containers())
        if now != [model.name]:
            _stop(engine, [n for n in now if n != model.name])
        _save_state(engine.dir, active=model.name, stopped_by_operator=False,
                    last_load_s=round(loaded - loading, 2))  # fmt: skip
        return {
            "ok": True,
            "changed": True,
            "active": model.name,
            "stopped": old,
            "load_seconds": loaded - loading,
            "downtime_seconds": loaded - stopped_at,
            "switch_seconds": time.monotonic() - began,
        }


def _gate_now(engine: Engine, model: catalog_mod.Model) -> bool:
    found = engine.containers().get(model.name)
    return bool(found and found.status == "running" and (found.health == "healthy" or
                engine_mod.health(engine.site, model.port) == 200))  # fmt: skip


def _rollback(cat: catalog_mod.Catalog, engine: Engine, old: list[str]) -> str:
    if not old:
        return "nothing served before, nothing serves now"
    previous = cat.resolve(old[0])
    try:
        _start(engine, previous)
        why = _gate(engine, previous)
    except LlamavmError as exc:
        why = str(exc)
    if why is None:
        _save_state(engine.dir, active=previous.name, stopped_by_operator=False)
        return f"rolled back: {previous.name} serves again"
    return f"the roll back to {previous.name} failed too: {why}"


def stop(engine: Engine, *, lock_timeout: float = 900) -> dict[str, Any]:
    """Stop every model's container of the project (the operator asked: nothing serves)."""
    with _lock(engine.dir, lock_timeout):
        found = engine.containers()
        up = sorted(n for n, c in found.items() if c.status in ("running", "restarting"))
        _stop(engine, up)
        _save_state(engine.dir, stopped_by_operator=True)
        return {"ok": True, "stopped": up}


def status(cat: catalog_mod.Catalog, engine: Engine) -> dict[str, Any]:
    """The host's answer in the shape `invoke status` shows for a systemd host."""
    found = engine.containers()
    running = engine_mod.running(found)
    state = _state(engine.dir)
    models = []
    for model in cat.models:
        box = found.get(model.name)
        up = box is not None and box.status == "running"
        models.append({
            "name": model.name,
            "port": model.port,
            "container": f"{PROJECT}-{model.name}",
            "file": f"{engine.site.models_dir}/{model.gguf}",
            "load": "container",
            "state": box.status if box else "absent",
            "health": engine_mod.health(engine.site, model.port) if up else None,
            "uptime_s": _uptime(box.started_at) if up and box else None,
            "loads": [state["last_load_s"]] if model.name == state.get("active") and
            state.get("last_load_s") else [],
            "companion": model.companion,
        })  # fmt: skip
    return {
        "ok": True,
        "kind": "compose",
        "project": str(engine.dir),
        "running": running,
        "models": [m for m in models if not m["companion"]],
        "companions": [
            {
                "name": m["name"],
                "port": m["port"],
                "state": "active" if m["state"] == "running" else "inactive",
                "health": m["health"],
                "task": cat.resolve(m["name"]).task,
                "admitted": True,
            }
            for m in models
            if m["companion"] and m["state"] != "absent"
        ],
        "stopped_by_operator": bool(state.get("stopped_by_operator")),
        "gpu": [],
    }


def _uptime(started_at: str) -> float | None:
    from datetime import datetime

    try:
        began = datetime.fromisoformat(started_at[:26].rstrip("Z") + "+00:00")
    except ValueError:
        return None
    return max(0.0, time.time() - began.timestamp())


def provision(cat: catalog_mod.Catalog, engine: Engine, default: str | None = None,
              say: Callable[[str], None] = print) -> list[str]:  # fmt: skip
    """Converge the project: render it, build its image, serve the default model when nothing
    serves (or the serving one from an older image). What changed, in words; [] for nothing."""
    rendered = render(cat, engine.site, engine.dir)
    done = [f"rendered {', '.join(rendered.changed)}"] if rendered.changed else []
    if engine_mod.build(engine, cat, rendered.image, say=say):
        done.append(f"built {rendered.image}")
    found = engine.containers()
    running = engine_mod.running(found)
    state = _state(engine.dir)
    if running and found[running[0]].image != engine.image_id(rendered.image):
        # The serving model runs an older image: the same model again, from the new one.
        answer = switch(cat, engine, running[0], say=say, restart=True)
        done.append(f"restarted {answer['active']} on the new image")
    elif not running and not state.get("stopped_by_operator"):
        answer = switch(cat, engine, default or cat.default.name, say=say)
        done.append(f"started {answer['active']}")
    elif not running:
        say("llamavm: no model serves (stopped by invoke stop): left stopped")
    return done


def detached_switch(inventory: Path, catalog_path: Path, name: str, *,
                    lock_timeout: float) -> dict[str, Any]:  # fmt: skip
    """`switch` in a process of its own session, as a systemd host's transaction runs detached
    on the host: an interrupted or killed CLI leaves it to complete or roll back by itself."""
    import sys

    cmd = [sys.executable, "-m", "llamavm.platforms.compose.switch", "switch", str(inventory),
           str(catalog_path), name, str(lock_timeout)]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # fmt: skip
    try:
        out, err = proc.communicate()
    except KeyboardInterrupt:
        raise LlamavmError(
            f"interrupted here — the switch to {name} goes on and completes or rolls back by "
            f"itself; invoke status -i {inventory.name} shows how it ended",
            code=130,
        ) from None
    lines = out.strip().splitlines()
    try:
        answer = json.loads(lines[-1]) if lines else {}
    except ValueError:
        answer = {}
    if not isinstance(answer, dict) or "ok" not in answer:
        said = (err or out).strip().splitlines()
        raise LlamavmError(
            f"the switch's process ended with status {proc.returncode}: "
            f"{said[-1] if said else 'no output'}",
            detail="\n".join(said[-15:-1]),
        )
    if not answer["ok"]:
        raise LlamavmError(
            answer.get("error", "failed"),
            code=answer.get("code", 1),
            detail=answer.get("detail", ""),
        )
    return answer


def _main(argv: list[str]) -> int:
    """`python -m llamavm.platforms.compose.switch switch INVENTORY CATALOG MODEL LOCK_TIMEOUT`:
    the detached transaction; its answer is the last line of stdout (JSON)."""
    from llamavm.inputs import inventory as inventory_mod
    from llamavm.ops import remote

    if len(argv) != 5 or argv[0] != "switch":
        print(
            "usage: python -m llamavm.platforms.compose.switch switch INVENTORY CATALOG MODEL "
            "LOCK_TIMEOUT"
        )
        return 2
    _, inventory, catalog_path, name, timeout = argv
    try:
        inv = inventory_mod.resolve(inventory)
        cat = catalog_mod.load(catalog_path)
        hosts = remote.hosts(inv.path)
        engine = Engine(site(inv, cat, hosts[0].address if hosts else None))
        answer = switch(cat, engine, name, lock_timeout=float(timeout))
    except LlamavmError as exc:
        answer = {"ok": False, "error": str(exc), "code": exc.exit_code, "detail": exc.detail}
    print(json.dumps(answer), flush=True)
    return 0 if answer["ok"] else int(answer["code"])


if __name__ == "__main__":
    import sys

    raise SystemExit(_main(sys.argv[1:]))

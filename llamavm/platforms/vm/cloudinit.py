"""cloud-init seeds from VM specs: render, validate against the guest's cloud-init, write.

The templates live in cloud-init/ (user-data, network-config v2 matched by MAC, meta-data) and
are rendered with strict undefined checks. Every rendering is validated against the JSON
schemas of the cloud-init version the image runs (config/images.yaml): those schemas come from
that version's Debian package, found through the Debian archive's package index and cached.
The NoCloud seed is an ISO 9660 volume labelled `cidata`, written byte-for-byte the same for
the same content, so a second run changes nothing.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import lzma
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import jinja2
import jsonschema
import yaml

from llamavm import REPO_ROOT, paths
from llamavm.errors import LlamavmError
from llamavm.platforms.vm import vmspec
from llamavm.platforms.vm.vmspec import VmSpec

TEMPLATES = REPO_ROOT / "cloud-init"
SCHEMA_DIR_IN_DEB = "usr/lib/python3/dist-packages/cloudinit/config/schemas"
CLOUD_CONFIG_SCHEMA = "schema-cloud-config-v1.json"
NETWORK_V2_SCHEMA = "schema-network-config-v2.json"


class SeedError(LlamavmError):
    """A rendered seed is invalid for its guest (a template or spec problem)."""

    exit_code = 2


@dataclass(frozen=True)
class Seed:
    user_data: str
    network_config: str
    meta_data: str
    instance_id: str

    def files(self) -> dict[str, str]:
        return {
            "user-data": self.user_data,
            "network-config": self.network_config,
            "meta-data": self.meta_data,
        }


def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )


def render(spec: VmSpec) -> Seed:
    """The seed of `spec` (templates in cloud-init/)."""
    env = _environment()
    try:
        user_data = env.get_template("user-data.yaml.j2").render(spec=spec)
        network = env.get_template("network-config.yaml.j2").render(spec=spec)
        digest = hashlib.sha256((user_data + network).encode()).hexdigest()[:12]
        instance_id = f"{spec.name}-{digest}"
        meta = env.get_template("meta-data.yaml.j2").render(spec=spec, instance_id=instance_id)
    except jinja2.TemplateError as exc:
        raise SeedError(f"{TEMPLATES}: rendering for {spec.host} failed: {exc}") from None
    return Seed(user_data, network, meta, instance_id)


# --- the guest's schemas --------------------------------------------------------------------


def _mirror() -> str:
    from llamavm.testbed import config as testbed_config

    return testbed_config.resolve_mirror(testbed_config.load_config()).rstrip("/")


def _cache() -> Path:
    return paths.cloud_init_schemas()


def _package_entry(mirror: str, suite: str) -> dict[str, str]:
    """The cloud-init stanza of `suite`'s package index (Version, Filename, SHA256)."""
    url = f"{mirror}/dists/{suite}/main/binary-all/Packages.xz"
    with urllib.request.urlopen(url, timeout=60) as answer:
        text = lzma.decompress(answer.read()).decode("utf-8", errors="replace")
    for stanza in text.split("\n\n"):
        fields = dict(
            line.split(": ", 1) for line in stanza.splitlines() if ": " in line and line[0] != " "
        )
        if fields.get("Package") == "cloud-init":
            return fields
    raise SeedError(f"{url} lists no cloud-init package")


@functools.cache
def schemas(version: str) -> dict[str, dict[str, Any]]:
    """The JSON schemas cloud-init `version` validates with: {file name: schema}.

    Fetched once from the Debian package of that version (config/images.yaml says which suite
    has it) and cached under ${LLAMAVM_CACHE}/cloud-init-schemas/<version>/.
    """
    folder = _cache() / version
    stamp = folder / "SOURCE"
    if not stamp.is_file():
        source = ((vmspec.images_file() or {}).get("cloud_init_schemas") or {}).get(version)
        if not isinstance(source, dict):
            raise SeedError(f"config/images.yaml: no cloud_init_schemas entry for {version!r}")
        mirror = _mirror()
        try:
            entry = _package_entry(mirror, source["suite"])
            if not entry.get("Version", "").startswith(source["version_prefix"]):
                raise SeedError(
                    f"config/images.yaml: cloud_init_schemas.{version}: {source['suite']} has "
                    f"cloud-init {entry.get('Version')}, not {source['version_prefix']}* — "
                    "update the entry"
                )
            with urllib.request.urlopen(f"{mirror}/{entry['Filename']}", timeout=120) as answer:
                deb = answer.read()
        except OSError as exc:
            raise SeedError(
                f"cannot fetch cloud-init {version}'s schemas from {mirror} ({exc}) — check "
                "the controller reaches its Debian mirror"
            ) from None
        if hashlib.sha256(deb).hexdigest() != entry.get("SHA256"):
            raise SeedError(f"{entry['Filename']}: checksum mismatch with the package index")
        _unpack_schemas(deb, folder)
        stamp.write_text(f"{entry['Filename']} {entry['Version']} {entry['SHA256']}\n")
    return {p.name: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


def _unpack_schemas(deb: bytes, folder: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        package = Path(tmp) / "cloud-init.deb"
        package.write_bytes(deb)
        subprocess.run(["dpkg-deb", "-x", str(package), str(Path(tmp) / "root")], check=True)
        found = sorted((Path(tmp) / "root" / SCHEMA_DIR_IN_DEB).glob("*.json"))
        if not found:
            raise SeedError("the cloud-init package holds no JSON schemas")
        staging = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for path in found:
            shutil.copy(path, staging / path.name)
        shutil.rmtree(folder, ignore_errors=True)
        staging.rename(folder)


def _first_error(schema: dict[str, Any], data: Any) -> str | None:
    cls = jsonschema.validators.validator_for(schema)
    error = jsonschema.exceptions.best_match(cls(schema).iter_errors(data))
    if error is None:
        return None
    where = ".".join(map(str, error.absolute_path)) or "(top level)"
    return f"{where}: {error.message[:200]}"


def validate_user_data(text: str, version: str, label: str) -> None:
    """Raise SeedError unless `text` is #cloud-config that passes cloud-init `version`'s
    schema (the WSL build's user-data uses this alone)."""
    if not text.startswith("#cloud-config\n"):
        raise SeedError(f"{label}: user-data must begin with #cloud-config")
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SeedError(f"{label}: user-data is not valid YAML: {exc}") from None
    problem = _first_error(schemas(version)[CLOUD_CONFIG_SCHEMA], doc)
    if problem:
        raise SeedError(
            f"{label}: user-data fails cloud-init {version}'s schema at {problem} — fix "
            "cloud-init/user-data.yaml.j2 or the spec"
        )


def validate(seed: Seed, version: str, label: str) -> None:
    """Raise SeedError unless the seed passes cloud-init `version`'s schemas."""
    found = schemas(version)
    docs = {}
    for name, text in seed.files().items():
        try:
            docs[name] = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise SeedError(f"{label}: {name} is not valid YAML: {exc}") from None
    validate_user_data(seed.user_data, version, label)
    network = docs["network-config"]
    if NETWORK_V2_SCHEMA in found:
        v2 = found[NETWORK_V2_SCHEMA]
        mapping = {k: v2[k] for k in ("$schema", "$defs") if k in v2}
        problem = _first_error({**mapping, "$ref": "#/$defs/network_config_version2"}, network)
        if problem:
            raise SeedError(
                f"{label}: network-config fails cloud-init {version}'s v2 schema at {problem}"
            )
    elif not (isinstance(network, dict) and network.get("version") == 2):
        raise SeedError(f"{label}: network-config is not netplan version 2")
    meta = docs["meta-data"]
    if not isinstance(meta, dict) or not meta.get("instance-id"):
        raise SeedError(f"{label}: meta-data has no instance-id")


# --- the NoCloud seed -------------------------------------------------------------------------


#: Every date in the seed volume (2020-01-01 UTC): the same content gives the same bytes.
FIXED_TIME = 1577836800.0


def iso_bytes(seed: Seed) -> bytes:
    """The seed as an ISO 9660 volume `cidata` (Joliet and Rock Ridge names), deterministic."""
    import pycdlib

    # pycdlib stamps the volume and every record with time.time(), in local time.
    with (
        mock.patch.object(time, "time", lambda: FIXED_TIME),
        mock.patch.object(time, "localtime", time.gmtime),
    ):
        iso = pycdlib.PyCdlib()
        iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident="cidata")
        for index, (name, text) in enumerate(sorted(seed.files().items())):
            data = text.encode()
            iso.add_fp(
                io.BytesIO(data),
                len(data),
                f"/SEED{index}.;1",
                rr_name=name,
                joliet_path=f"/{name}",
            )
        out = io.BytesIO()
        iso.write_fp(out)
        iso.close()
    return out.getvalue()


def write_seed(seed: Seed, path: Path) -> bool:
    """Write the seed ISO at `path` unless the same bytes are there; True when it changed."""
    data = iso_bytes(seed)
    if path.is_file() and path.read_bytes() == data:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return True

"""The catalog the unit tests start from (VALID): two models, alpha (the default) and beta.
A test changes a deep copy of it, never VALID itself, and writes it with catalog_file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

VALID: dict[str, Any] = {
    "settings": {
        "share_path": "/mnt/models",
        "controller_share_path": None,
        "bind_address": "0.0.0.0",
        "default_model": "alpha",
        "reserved_ports": {"ssh": 22, "node_exporter": 9100, "proxy": 8443},
        "vram": {"budget_mib": 32607, "reserve_mib": 1024, "compute_mib": 1024},
        "api_key": {"policy": "required", "file": "/etc/llamavm/api-key"},
    },
    "models": [
        {"name": "alpha", "aliases": ["a"], "gguf": "alpha/alpha.gguf", "port": 8001},
        {"name": "beta", "aliases": ["b"], "gguf": "beta.gguf", "port": 8002, "n_cpu_moe": 4},
    ],
}


def catalog_file(tmp_path: Path, data: Any, name: str = "models.yaml") -> Path:
    """`data` written as a catalog file, tmp_path / name."""
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path

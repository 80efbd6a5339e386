"""The catalog the unit tests start from (VALID): two models, alpha (the default) and beta.
A test changes a deep copy of it, never VALID itself."""

from __future__ import annotations

from typing import Any

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

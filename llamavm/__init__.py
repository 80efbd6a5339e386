"""llamavm: provisioning as code for one big llama.cpp model at a time, served to the LAN."""

from pathlib import Path

__version__ = "0.1.0"

#: The repository root (the folder holding tasks.py, config/, ansible/, inventories/).
REPO_ROOT = Path(__file__).resolve().parent.parent

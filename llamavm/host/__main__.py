"""`python -m llamavm.host` (and the llamavm-switch zipapp) runs the host CLI."""

from llamavm.host.cli import entry

entry()

"""`python -m llamavm.host` and the host zipapp: llamavm-switch; llamavm-passthrough when run
under that name (or with `passthrough` as its first argument, as Ansible's script module does)."""

import os
import sys

if os.path.basename(sys.argv[0]) == "llamavm-passthrough" or sys.argv[1:2] == ["passthrough"]:
    from llamavm.host.passthrough import main

    sys.exit(main(sys.argv[2:] if sys.argv[1:2] == ["passthrough"] else None))

from llamavm.host.cli import entry

entry()

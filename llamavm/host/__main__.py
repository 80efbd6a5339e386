"""`python -m llamavm.host` and the host zipapp: llamavm-switch, or llamavm-passthrough when
run under that name (the hypervisor role links it)."""

import os
import sys

if os.path.basename(sys.argv[0]) == "llamavm-passthrough":
    from llamavm.host.passthrough import main

    sys.exit(main())

from llamavm.host.cli import entry

entry()

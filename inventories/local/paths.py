#!/usr/bin/env python3
"""This inventory's paths under llamavm's cache and state folders, from
llamavm/testbed/localinv.py: Ansible runs this file (executable, in the inventory folder) as a
second source beside hosts.yml. The other local inventories link to it; the folder's name says
which inventory it is."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from llamavm.testbed import localinv

localinv.main(Path(__file__).parent.name, sys.argv[1:])

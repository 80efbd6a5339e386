"""`python -m llamavm.testbed {up,down,status,ssh,client}`: the test-bed machine's CLI."""

from __future__ import annotations

import argparse
import json
import sys
import time

from llamavm.errors import LlamavmError
from llamavm.testbed import machine


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llamavm.testbed", description=machine.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="build (if needed) and boot the test bed; wait for SSH")
    p_down = sub.add_parser("down", help="stop the test bed and remove its LAN")
    p_down.add_argument("--purge", action="store_true", help="also delete the machine rootfs")
    sub.add_parser("status", help="print the test bed's status as JSON")
    p_ssh = sub.add_parser("ssh", help="ssh to the host as the admin user")
    p_ssh.add_argument("args", nargs=argparse.REMAINDER, help="remote command")
    p_client = sub.add_parser("client", help="run a command in the LAN client's namespace")
    p_client.add_argument("args", nargs=argparse.REMAINDER, help="command, e.g. curl URL")
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            started = time.monotonic()
            info = machine.up()
            print(json.dumps(info.to_dict(), indent=2))
            print(f"llamavm testbed: up in {time.monotonic() - started:.1f} s", file=sys.stderr)
        elif args.command == "down":
            machine.down(purge=args.purge)
        elif args.command == "status":
            print(json.dumps(machine.status(), indent=2))
        elif args.command == "ssh":
            return machine.ssh(args.args)
        elif args.command == "client":
            command = args.args[1:] if args.args[:1] == ["--"] else args.args
            if not command:
                parser.error("client needs a command")
            return machine.client_run(command).returncode
    except LlamavmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""On-host code of llamavm: the switch transaction, the health gate, unit apply, status.

It runs on every model host as ``llamavm-switch``, a zipapp of this package that the
model_services role installs; the controller's tests import it like any other module. Python's
standard library only: model hosts have no virtual environment. Everything it needs to know
about the host (paths, units, argv, health URLs) comes from the host contract that the
controller computed (at contract.CONTRACT_PATH); it derives nothing itself.
"""

#: Exit codes of every mutating command, and of `invoke switch`.
EXIT_OK = 0
EXIT_FAILED = 1  # failed, and rolled back: the previous model serves again
EXIT_REFUSED = 2  # refused before anything was stopped
EXIT_LOCK = 3  # another transaction held the lock too long
EXIT_ROLLBACK_FAILED = 4  # failed, and the rollback failed too: look at the host
EXIT_UNKNOWN = 5  # the outcome could not be learned (the transaction died, or is unreachable)
EXIT_RUNNING = 6  # `result --wait` gave up waiting: the transaction still runs

#: A transaction id (`--tx`, the helper's and the control API's "tx"): the controller picks it,
#: so that a caller whose connection broke can still ask how that transaction ended.
TX_PATTERN = r"[a-z0-9]{6,32}"

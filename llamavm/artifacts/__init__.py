"""What provisioning derives from the inputs and ships to the hosts: the host contract, the
llama.cpp source tarball, the host package zipapp, and the tiny stand-in models."""

"""What acts on the hosts: provision and converge, the playbook runner, SSH (remote), the control
API client, fleet-wide switching, and doctor."""

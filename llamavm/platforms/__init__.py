"""Where a model host runs, one module or folder per platform: libvirt VMs (vm/), Proxmox VE,
WSL 2 (its templates in wsl_templates/), a Docker Compose project (compose/)."""

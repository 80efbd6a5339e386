"""libvirt VMs: the validated spec, its cloud-init seed, the libvirt domain, the guest image, the
rendering of a hypervisor's VMs for the libvirt_vms role, and the VM lifecycle (vmctl)."""

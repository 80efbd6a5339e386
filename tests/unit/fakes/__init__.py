"""What the unit tests share, in one place: fakes at the seams (a host's systemd and contract,
the control service's helper, nftables, a Proxmox API), the catalog they start from, GGUF files
of known shapes, and the dashboard's series. Tests import these from here, never from another
test module."""

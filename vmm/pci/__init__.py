"""PCI: configuration space (config.py), MSI-X (msix.py), the host bridge on bus 0 (host.py),
and the guest address windows the machine gives PCI (layout.py)."""

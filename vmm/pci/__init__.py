"""vmm/pci"""

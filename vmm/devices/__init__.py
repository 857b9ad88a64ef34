"""vmm/devices"""

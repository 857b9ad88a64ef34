"""vmm/kvm"""

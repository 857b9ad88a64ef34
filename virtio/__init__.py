"""virtio"""

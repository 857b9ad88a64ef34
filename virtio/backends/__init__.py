"""virtio/backends"""

"""Starting a virtio device on a fuzzed ring, and what its used ring must show afterwards.

    attach(dev.queues[i], ring)            # the driver's queue set-up, as a transport writes it
    start(dev, ring, extra_features)       # features (VERSION_1, EVENT_IDX / INDIRECT as the ring
                                           # says), then the status bits up to DRIVER_OK
    ...the device processes the queue...
    check_used(mem, ring, refs)            # elements for heads made available, none too long

`aliased(heads, buffers)`: whether requests may overwrite each other's results.
`broken(ring)`: whether the device must give up on the queue (NEEDS_RESET): avail.idx too far
ahead, or a head the used ring cannot name.
"""

from __future__ import annotations

from tests.fuzz.harness import check
from tests.fuzz.rings import AVAIL_RING, DESC_TABLE, USED_RING, Ring, Walked
from virtio.device import (
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_F_VERSION_1,
)
from virtio.queue import VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC

STARTED = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK


def attach(queue, ring: Ring) -> None:
    queue.size = ring.size
    queue.desc_table, queue.avail_ring, queue.used_ring = DESC_TABLE, AVAIL_RING, USED_RING
    queue.next_avail = queue.next_used = ring.start
    queue.ready = True


def start(dev, ring: Ring, features: int = 0) -> None:
    """Negotiate and set DRIVER_OK (the device's queues attached first); the ring's own
    features (EVENT_IDX, INDIRECT_DESC) are as `ring` says, whatever `features` holds."""
    features &= ~(1 << VIRTIO_F_EVENT_IDX | 1 << VIRTIO_F_INDIRECT_DESC)
    features |= 1 << VIRTIO_F_VERSION_1
    features |= (ring.event_idx << VIRTIO_F_EVENT_IDX) | (ring.indirect << VIRTIO_F_INDIRECT_DESC)
    dev.driver_features = features
    dev.set_status(STARTED)
    check(dev.status == STARTED, f"{dev.name} did not start: status {dev.status:#x}")


def broken(ring: Ring) -> bool:
    return ring.pending > ring.size or any(h >= ring.size for h in ring.heads)


def aliased(heads: list[int], buffers: list[tuple[int, int]]) -> bool:
    """Whether the driver made a chain available twice or let buffers overlap: then what one
    request wrote, another may overwrite (a header, a status byte), and only where-checks hold."""
    spans = sorted(buffers)
    return len(set(heads)) < len(heads) or any(a + n > b for (a, n), (b, _) in zip(spans, spans[1:]))


def check_used(mem, ring: Ring, refs: dict[int, Walked | None], *, once: bool = False) -> list[tuple[int, int]]:
    """The used elements published since `ring.start`: each for a head made available (`once`:
    at most as often as it was), its length within the chain's writable length (0 for a
    malformed chain).  Returns them."""
    count = (ring.used_idx(mem) - ring.start) & 0xFFFF
    check(count <= len(ring.heads), f"{count} used elements for {len(ring.heads)} chains")
    used = ring.used_elements(mem, count)
    for head, length in used:
        check(head in refs, f"a used element for head {head}, which was not made available")
        ref = refs[head]
        check(length <= (ref.writable_len if ref else 0), f"used length {length} of chain {head} is too long")
        if once:
            check(sum(1 for h, _ in used if h == head) <= ring.heads.count(head), f"head {head} used too often")
    return used

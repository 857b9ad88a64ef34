"""Fuzz target: the one-chain virtqueue walk (virtio/queue.py): drain(), pop(), pop_buffers().

    python -m tests.fuzz.fuzz_queue [libFuzzer flags] [tests/fuzz/corpus/fuzz_queue]

A whole queue from the input (tests/fuzz/rings.py: direct and indirect chains, EVENT_IDX,
wrapped indices, garbage), in RAM at mapping offset 0 or behind a 4 KiB skew.  Asserts:
  * only QueueError (avail.idx more than `size` ahead, and nothing else) or ChainError escape;
  * every chain is what the reference walk says (the same buffers, each inside RAM, inside its
    descriptor and of its direction; the same descriptor count); a ChainError exactly where
    the reference finds the chain malformed, completable exactly when its head is valid;
  * the walk takes exactly the `pending` chains (no more iterations: bounded);
  * the device writes nothing but the used ring, and its elements are what was completed,
    never longer than the chain's writable length.
"""

from __future__ import annotations

import atheris

from tests.fuzz import harness
from tests.fuzz.harness import check

with harness.instrumented():
    from tests.fuzz.rings import fuzzed_ring, memories
    from virtio.queue import ChainError, QueueError

MEMORIES = memories()


def _same_chain(ref, readable, writable, descriptors) -> None:
    check(ref is not None, f"chain {readable} {writable} accepted, the reference finds it malformed")
    check((ref.readable, ref.writable, ref.descriptors) == (readable, writable, descriptors),
          f"chain differs from the reference: {readable} {writable} {descriptors} vs {ref}")


def _walk_one(mem, ring, q, mode: int, ref) -> tuple[int, int] | None:
    """Pop the next chain one way; (head, used length) to complete it with, or None (nothing to)."""
    try:
        if mode == 0:
            chain = q.pop()
            check(chain is not None, "pop() found no chain where the driver made one available")
            _same_chain(ref, chain.readable, chain.writable, chain.ring_descriptors)
            mem.check_views(chain.readable_views() + chain.writable_views(), chain.readable + chain.writable)
            return chain.head, chain.writable_len
        got = q.pop_buffers()
        check(got is not None, "pop_buffers() found no chain where the driver made one available")
        head, views, length, writable, descriptors = got
        check(ref is not None and not (ref.readable and ref.writable), f"pop_buffers accepted chain {head}")
        spans = [(mem.gpa_of(v), len(v)) for v in views]
        _same_chain(ref, [] if writable else spans, spans if writable else [], descriptors)
        check(length == sum(n for _, n in spans), "pop_buffers' length is not its buffers' total")
        return head, length if writable else 0
    except ChainError as err:
        check(ref is None or (mode == 1 and ref.readable and ref.writable), f"ChainError on a good chain: {err}")
        check(err.completable == (err.head < ring.size), f"completable is wrong for head {err.head}")
        return (err.head, 0) if err.completable else None


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    mem, ring, walks = fuzzed_ring(fdp, MEMORIES)
    q = ring.queue(mem)
    mode = fdp.ConsumeIntInRange(0, 1)
    before = mem.snapshot()
    completed, refs = [], [walks[head] for head in ring.heads]
    try:
        for ref in refs:
            done = _walk_one(mem, ring, q, mode, ref)
            if done is not None:
                q.add_used(*done)
                completed.append((done, ref))
        check(q.pop() is None, "a chain beyond what the driver made available")
        check(ring.pending <= ring.size, "avail.idx too far ahead and no QueueError")
    except QueueError:
        check(ring.pending > ring.size and not completed, "QueueError on a good available ring")
    q.publish_used()
    q.needs_notification()
    try:
        q.enable_notification()
    except QueueError:
        check(ring.pending > ring.size, "QueueError from enable_notification on a good available ring")
    mem.check_writes(before, [ring.used_area()], "the queue")
    check(ring.used_idx(mem) == (ring.start + len(completed)) & 0xFFFF, "used.idx is not what was completed")
    for (head, length), ((done_head, done_length), ref) in zip(ring.used_elements(mem, len(completed)), completed):
        check((head, length) == (done_head, done_length), "a used element is not what was completed")
        check(ref is None and length == 0 or ref is not None and length <= ref.writable_len,
              "a used element claims more than the chain's writable length")


if __name__ == "__main__":
    harness.main(one_input)

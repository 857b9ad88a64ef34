"""Fuzz target: the batch walk (virtio/batch.py's BatchReader) against the one-chain walk.

    python -m tests.fuzz.fuzz_batch [libFuzzer flags] [tests/fuzz/corpus/fuzz_batch]

A differential target: the same ring (tests/fuzz/rings.py) is peeked in one batch with
limits from the input (way, lengths, first buffer, buffers per chain) and walked chain by
chain with Queue.pop_buffers on a second Queue over the same memory.  Asserts:
  * peek and available() fail alike (QueueError) on a broken available ring, and only so;
  * every chain the batch takes, pop_buffers takes too, with the same head, the same buffers
    (iovec rows turned back into guest addresses: inside RAM, inside the chain's descriptors),
    the same total and way; and the batch honours every limit it was given;
  * consume + complete write nothing but the used ring, elements equal to what was given.
"""

from __future__ import annotations

import atheris
import numpy as np

from tests.fuzz import harness
from tests.fuzz.harness import check

with harness.instrumented():
    from tests.fuzz.rings import fuzzed_ring, memories
    from virtio.batch import MAX_BATCH_DESCRIPTORS, BatchReader
    from virtio.queue import MAX_CHAIN_BYTES, ChainError, QueueError

MEMORIES = memories()


def _limits(fdp: atheris.FuzzedDataProvider) -> dict:
    return {
        "writable": fdp.ConsumeBool(),
        "min_length": fdp.ConsumeIntInRange(1, 0x1000) if fdp.ConsumeBool() else 1,
        "max_length": fdp.ConsumeIntInRange(1, 0x4000) if fdp.ConsumeBool() else MAX_CHAIN_BYTES,
        "min_first": fdp.ConsumeIntInRange(1, 64) if fdp.ConsumeBool() else 1,
        "max_buffers": fdp.ConsumeIntInRange(1, MAX_BATCH_DESCRIPTORS),
    }


def _compare_row(mem, reader, batch, row: int, twin, limits: dict) -> None:
    head = int(batch.heads[row])
    try:
        got = twin.pop_buffers()
    except ChainError as err:
        raise harness.InvariantError(f"the batch took chain {head}, the one-chain walk refuses it: {err}")
    check(got is not None and got[0] == head, f"batch row {row} is head {head}, the one-chain walk says {got}")
    _, views, length, writable, _ = got
    rows = batch.iov[row, : batch.counts[row]]
    spans = [(mem.gpa_of_address(int(a)), int(n)) for a, n in rows]
    check(spans == [(mem.gpa_of(v), len(v)) for v in views], f"chain {head}: buffers {spans} differ")
    check([(mem.gpa_of(v), len(v)) for v in reader.views(batch, row)] == spans, "views() differ from the row")
    check(writable == limits["writable"] and length == int(batch.lengths[row]), f"chain {head}: way or length")
    check(limits["min_length"] <= length <= limits["max_length"], f"chain {head}: length {length} outside limits")
    check(spans[0][1] >= limits["min_first"] and len(spans) <= limits["max_buffers"], f"chain {head}: shape limits")
    check(int(batch.first[row]) == spans[0][0], f"chain {head}: first address")


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    mem, ring, refs = fuzzed_ring(fdp, MEMORIES)
    q, twin = ring.queue(mem), ring.queue(mem)
    reader = BatchReader(q)
    limits = _limits(fdp)
    limit = fdp.ConsumeIntInRange(1, 64)
    before = mem.snapshot()
    try:
        batch = reader.peek(limit, **limits)
    except QueueError:
        check(ring.pending > ring.size, "peek raised QueueError on a good available ring")
        return
    finally:
        mem.check_writes(before, [], "peek")
    check(ring.pending <= ring.size, "avail.idx too far ahead and no QueueError from peek")
    check((batch is None) == (ring.pending == 0), "peek's None does not mean an empty ring")
    if batch is None:
        return
    check(len(batch) <= min(limit, ring.pending), "the batch is longer than asked or available")
    for row in range(len(batch)):
        _compare_row(mem, reader, batch, row, twin, limits)
        check(refs[int(batch.heads[row])] is not None, "the batch took a chain the reference walk finds malformed")
    lengths = np.array([fdp.ConsumeIntInRange(0, int(n)) if limits["writable"] else 0 for n in batch.lengths],
                       dtype=np.int64)
    reader.consume(len(batch))
    reader.complete(batch.heads, lengths)
    q.publish_used()
    reader.close()
    mem.check_writes(before, [ring.used_area()], "complete")
    got = ring.used_elements(mem, len(batch))
    check(got == list(zip(batch.heads.tolist(), lengths.tolist())), f"used elements {got} are not what was completed")
    check(ring.used_idx(mem) == (ring.start + len(batch)) & 0xFFFF, "used.idx is not what was completed")


if __name__ == "__main__":
    harness.main(one_input)

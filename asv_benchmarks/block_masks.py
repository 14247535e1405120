"""Block masks made for a broadcast batch shape: the goal of issue 22, part 4.

``create_block_mask(mask_mod, (1, 1), L, L)`` evaluates ``mask_mod`` once for the
batch axes it broadcasts along and stores the tiles once, where the mask made per
entry, ``(B, H)``, evaluates and stores them ``B * H`` times. Goal, for ``(8, 32,
8192, 8192)``: the broadcast mask in at most 1/200 of the per-entry mask's time and
memory.

asv: :class:`TimeCreateBlockMask` times each version; :class:`TrackBlockMaskMemory`
reports the bytes each allocates at its peak (``tracemalloc``: the tile states, the
arrays made while checking; a process's peak resident memory would measure the
interpreter). Run as a script, the two versions are timed in interleaved rounds (A
B A B, the ratio taken within each round; the median with its min and max)::

    python asv_benchmarks/block_masks.py [--rounds 5] [--batch 8 32] [--length 8192]
"""

import argparse
import functools
import sys
import time
import tracemalloc

import numpy as np

BATCH, LENGTH = (8, 32), 8192
VERSIONS = ["broadcast (1, 1)", "per entry (B, H)"]


@functools.cache
def documents_mask():
    """``mask_mod(b, h, i, j, document_of)``: causal within each token's document,
    the same for every batch entry and head."""
    import numba

    @numba.njit
    def mask_mod(b, h, i, j, document_of):
        return document_of[i] == document_of[j] and j <= i

    return mask_mod


def document_ids(length, seed=0):
    """Sorted document ids ``(L,)`` of documents of about 1000 tokens."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.integers(0, max(1, length // 1000), length))


def creators(batch=BATCH, length=LENGTH):
    """``{version: create}``: each makes the block mask of one version."""
    import fastattn

    mask_mod, ids = documents_mask(), document_ids(length)
    shapes = {VERSIONS[0]: (1,) * len(batch), VERSIONS[1]: tuple(batch)}
    return {version: (lambda shape=shape: fastattn.create_block_mask(
        mask_mod, shape, length, length, mask_mod_args=(ids,))) for version, shape in
        shapes.items()}


def allocated_bytes(create):
    """``(stored, peak)``: the bytes still allocated once ``create`` has returned,
    its result held (what the block mask keeps: its tile states), and the bytes
    allocated at the peak while it ran (with the evaluation's scratch blocks), by
    ``tracemalloc``."""
    tracemalloc.start()
    try:
        result = create()  # noqa: F841 - held while measured
        return tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()


class TimeCreateBlockMask:
    """``create_block_mask`` of a causal-documents mask for ``(8, 32, 8192, 8192)``
    calls, broadcast or per entry."""

    params = [VERSIONS]
    param_names = ["version"]
    timeout = 900
    number = 1
    repeat = (1, 3, 60.0)

    def setup(self, version):
        self.create = creators()[version]
        creators(BATCH, 256)[version]()  # compile or load the kernel and the hook

    def time_create(self, version):
        self.create()


class TrackBlockMaskMemory:
    """Bytes ``create_block_mask`` keeps (the block mask) and allocates at its peak
    (the same cases)."""

    params = [VERSIONS]
    param_names = ["version"]
    unit = "bytes"
    timeout = 900

    def setup(self, version):
        self.create = creators()[version]
        creators(BATCH, 256)[version]()

    def track_stored_bytes(self, version):
        return allocated_bytes(self.create)[0]

    def track_peak_bytes(self, version):
        return allocated_bytes(self.create)[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, nargs="+", default=list(BATCH))
    parser.add_argument("--length", type=int, default=LENGTH)
    arguments = parser.parse_args()
    calls = creators(tuple(arguments.batch), arguments.length)
    for create in creators(tuple(arguments.batch), 256).values():
        create()  # compile or load
    times = {version: [] for version in calls}
    for step in range(arguments.rounds):
        for version, create in calls.items():
            started = time.perf_counter()
            create()
            times[version].append(time.perf_counter() - started)
        print(f"  round {step + 1}/{arguments.rounds}", file=sys.stderr)
    memory = {version: allocated_bytes(create) for version, create in calls.items()}
    shape = tuple(arguments.batch) + (arguments.length, arguments.length)
    print(f"create_block_mask for {shape}:")
    for version in calls:
        stored, peak = memory[version]
        print(f"  {version}: median {np.median(times[version]) * 1e3:.1f} ms, "
              f"stored {stored} bytes, peak {peak} bytes")
    ratio = np.array(times[VERSIONS[1]]) / np.array(times[VERSIONS[0]])
    print(f"  time per entry / broadcast: median {np.median(ratio):.1f} [min {ratio.min():.1f}, "
          f"max {ratio.max():.1f}] over {ratio.size} rounds (goal >= 200)")
    for which, name in enumerate(("stored", "peak")):
        print(f"  {name} memory per entry / broadcast: "
              f"{memory[VERSIONS[1]][which] / memory[VERSIONS[0]][which]:.1f} (goal >= 200)")


if __name__ == "__main__":
    main()

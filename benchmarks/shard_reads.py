"""What does a training step's random order cost in shard reads?

Training visits samples in a random permutation of the whole data set
(:class:`trainer.batches.ResumableBatches`). Writes ``--shards`` tar shards of ``--per-shard``
synthetic JPEG photographs (``benchmarks/decode.py``'s) with their indexes under ``--uri`` (a temp
folder by default; an ``s3://`` prefix with ``AWS_ENDPOINT_URL`` and keys set for object storage),
then reads ``--samples`` samples in a random order two ways and prints bytes and seconds per sample
and the ratio: as :class:`~trainer.data.shards.ShardDataset` reads them now (each by its byte range,
the shards' indexes read to start) and as it read them before (the whole shard for each sample but
the last one kept, and every shard read whole to index it at the start). Image decoding is left
out of both (it is ``benchmarks/decode.py``'s). Asserts nothing.

    python benchmarks/shard_reads.py
    python benchmarks/shard_reads.py --shards 8 --per-shard 500 --samples 200
"""

from __future__ import annotations

import argparse
import io
import tarfile
import tempfile
import time

import numpy as np

from decode import photograph  # this script's folder is first on sys.path
from components.stage import storage_from_env
from dinoflow.storage import Storage, join_uri
from trainer.data.shards import ShardDataset, write_shard_index


class Tally(Storage):
    """A Storage that counts the bytes it reads."""

    read = 0

    def read_bytes(self, uri: str) -> bytes:
        data = super().read_bytes(uri)
        self.read += len(data)
        return data

    def read_range(self, uri: str, start: int, size: int) -> bytes:
        data = super().read_range(uri, start, size)
        self.read += len(data)
        return data


def write(storage: Storage, root: str, shards: int, per_shard: int) -> list[str]:
    """``shards`` shards of ``per_shard`` 500 x 375 JPEGs (a few distinct ones repeated: writing is
    not what is measured), each indexed."""
    pictures = [photograph(500, 375, seed) for seed in range(16)]
    uris = []
    for shard in range(shards):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for i in range(per_shard):
                data = pictures[(shard * per_shard + i) % len(pictures)]
                info = tarfile.TarInfo(f"{i:06d}.jpg")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        uri = join_uri(root, f"shard-{shard:05d}.tar")
        storage.write_bytes(uri, buffer.getvalue())
        write_shard_index(storage, uri, buffer.getvalue())
        uris.append(uri)
    return uris


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=6)
    parser.add_argument("--per-shard", type=int, default=400, help="images per shard (~90 kB each)")
    parser.add_argument("--samples", type=int, default=100, help="samples read in a random order, each way")
    parser.add_argument("--uri", default="", help="where to write the shards (default: a temp folder)")
    args = parser.parse_args()
    settings = storage_from_env()
    storage = Tally(settings.s3, settings.retry)
    root = args.uri or tempfile.mkdtemp(prefix="shard-reads-")
    uris = write(storage, root, args.shards, args.per_shard)
    order = np.random.default_rng(0).permutation(args.shards * args.per_shard)[:args.samples]

    storage.read, tick = 0, time.perf_counter()
    dataset = ShardDataset(storage, uris, load_size=8)
    start_bytes, start_seconds = storage.read, time.perf_counter() - tick
    storage.read, tick = 0, time.perf_counter()
    for index in order:
        storage.read_range(*dataset.location(int(index)))
    now = (storage.read, time.perf_counter() - tick)

    storage.read, tick = 0, time.perf_counter()
    for uri in uris:  # before: every shard read whole to index it
        storage.read_bytes(uri)
    before_start = (storage.read, time.perf_counter() - tick)
    storage.read, tick, kept = 0, time.perf_counter(), ""
    for index in order:  # before: the whole shard for each sample, the last one kept
        shard = dataset.location(int(index))[0]
        if shard != kept:
            storage.read_bytes(shard)
            kept = shard
    before = (storage.read, time.perf_counter() - tick)

    mb = 1e6
    print(f"{args.shards} shards x {args.per_shard} JPEGs ({before_start[0] / args.shards / mb:.0f} MB a shard) under "
          f"{root}; {args.samples} samples in a random order")
    print(f"{'':32}{'start: MB':>10}{'start: s':>10}{'kB/sample':>11}{'ms/sample':>11}")
    for name, (first, first_s), (read, seconds) in (("by byte range, indexes (now)", (start_bytes, start_seconds), now),
                                                    ("whole shards (before)", before_start, before)):
        print(f"{name:32}{first / mb:10.2f}{first_s:10.2f}{read / args.samples / 1e3:11.0f}"
              f"{1e3 * seconds / args.samples:11.2f}")
    print(f"bytes per sample: {before[0] / max(now[0], 1):.0f}x fewer; time per sample: "
          f"{before[1] / max(now[1], 1e-9):.0f}x less")


if __name__ == "__main__":
    main()

"""Check a shard set against its manifest: `python -m shards.verify [--hashes] ROOT`."""

from __future__ import annotations

import argparse
import sys

from shards.manifest import ManifestError, read_manifest, verify


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("root", help="shard set folder or URL (holds manifest.parquet)")
    ap.add_argument("--hashes", action="store_true", help="also compare every shard's sha256 (reads everything)")
    args = ap.parse_args(argv)
    try:
        m = read_manifest(args.root)
        verify(m, check_hashes=args.hashes)
    except ManifestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args.root}: {m.samples.num_rows} samples in {len(m.shards)} shards match the manifest"
          + (" (sizes, indexes and sha256)" if args.hashes else " (sizes and indexes)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

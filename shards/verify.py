"""Check a shard set against its manifest: `python -m shards.verify root=DIR [hashes=true]` (or tubelet-verify)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional, Sequence

from common.cli import main_for
from common.config import check
from shards.manifest import ManifestError, verify


@dataclass
class VerifyConfig:
    root: str = "data/shards/sample"  # shard set folder or URL (holds manifest.parquet)
    hashes: bool = False  # also compare every shard's sha256 (reads everything)

    def validate(self) -> None:
        check(bool(self.root), "root", "must name a shard set folder or URL")


def run(cfg: VerifyConfig) -> None:
    index = verify(cfg.root, check_hashes=cfg.hashes)
    print(f"{cfg.root}: {index.meta['rows']} samples in {index.shards.num_rows} shards match the manifest"
          + (" (sizes, indexes and sha256)" if cfg.hashes else " (sizes and indexes)"))


def main(argv: Optional[Sequence[str]] = None) -> int:
    return main_for(VerifyConfig, run, argv, prog="tubelet-verify", doc=__doc__, errors={ManifestError: 2})


if __name__ == "__main__":
    sys.exit(main())

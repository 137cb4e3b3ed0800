"""`make shards`: raw videos -> validated WebDataset shards + DALI index files + a parquet manifest.

    python -m shards.make_shards [--config configs/shards.yaml] [key=value ...]    (or tubelet-shards)

With no `inputs`, the built-in sample is generated into `sample_dir` (when absent) and sharded (with `kind=image`,
the built-in image sample, `configs/shards_images.yaml`). The work itself is `shards.build.run`.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Optional, Sequence

from common.cli import main_for
from shards.build import run
from shards.config import ShardsConfig
from shards.output import ShardsError
from shards.sources import InputError


def make_shards(cfg: ShardsConfig) -> Optional[dict]:
    if not cfg.inputs and cfg.kind == "image":  # the built-in image sample: class folders
        from shards.synthetic.images import generate_images

        root = generate_images(cfg.sample_dir)
        cfg = dataclasses.replace(cfg, inputs={"train": str(root / "train"), "val": str(root / "val")},
                                  labels_from_dirs=True)
    elif not cfg.inputs:
        from shards.synthetic.generate import generate

        root = generate(cfg.sample_dir)
        cfg = dataclasses.replace(cfg, inputs={"train": str(root / "train.csv"), "val": str(root / "val.csv")})
    return run(cfg)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return main_for(ShardsConfig, make_shards, argv, prog="tubelet-shards", doc=__doc__,
                    errors={InputError: 2, ShardsError: 2})


if __name__ == "__main__":
    sys.exit(main())

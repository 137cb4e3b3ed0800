"""The run's log on rank 0: every step to `run_dir/losses.jsonl`, a log line every `log_every` steps (window
averages and the time left)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import List

from common.files import atomic_write
from common.logs import duration

log = logging.getLogger(__name__)


def trim_losses(path: Path, step: int) -> None:
    """Keep the rows of losses.jsonl up to `step` (a resumed run rewrites what came after its checkpoint)."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    atomic_write(path, "".join(ln + "\n" for ln in keep))


class RunLog:
    """Rank 0: every step to losses.jsonl, a line to stdout every `every` steps (window averages)."""

    def __init__(self, path: Path, every: int, last_step: int, world_size: int, enabled: bool, unit: str = "clips"):
        self.every, self.last_step, self.world_size, self.enabled = every, last_step, world_size, enabled
        self.unit = unit  # what a batch holds: clips, or images
        self.file = open(path, "a") if enabled else None
        self.window: List[dict] = []

    def step(self, row: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        self.window.append(row)
        if row["step"] % self.every and row["step"] != self.last_step:
            return
        w, self.window = self.window, []
        step_s, data_s = sum(r["step_s"] for r in w), sum(r["data_s"] for r in w)
        clips = sum(r["clips"] for r in w) * self.world_size
        losses = [r["loss"] for r in w if not r["skipped"]]
        loss = sum(losses) / len(losses) if losses else float("nan")
        eta = duration((self.last_step - row["step"]) * step_s / len(w))
        log.info(f"step {row['step']:>7}/{self.last_step} | loss {loss:.4f} | lr {row['lr']:.3e} | "
                 f"{clips / step_s:7.1f} {self.unit}/s | step {step_s / len(w):.3f} s | data wait {data_s / step_s:4.0%} | "
                 f"eta {eta}" + (f" | skipped {sum(r['skipped'] for r in w)}" if any(r["skipped"] for r in w) else "")
                 + (" | target std {target_std:.2f} erank {target_erank:.2f} clip {target_clip_share:.2f} "
                    "pos {target_position_share:.2f}".format(**row) if "target_std" in row else ""))

    def close(self) -> None:
        if self.file:
            self.file.close()

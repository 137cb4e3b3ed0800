"""Fault injection for the reliability tests: each variable is read once at start (`Faults.from_env`).

    TUBELET_FAULT_KILL=RANK:STEP     rank RANK SIGKILLs itself when it reaches step STEP (first attempt only:
                                     TORCHELASTIC_RESTART_COUNT unset or 0), as a node failure would.
    TUBELET_FAULT_NAN=STEP           the loss of step STEP is NaN (on every rank; RANK:STEP: on that rank only).
    TUBELET_FAULT_KILL_IN_CKPT=STEP  rank 0 SIGKILLs itself half-way through writing checkpoint STEP (first
                                     attempt only); the previous checkpoint must still load.
    TUBELET_FAULT_SLOW_LOADER=SECONDS  every batch arrives SECONDS late, as from a loader that cannot keep up;
                                     Nx: N times the time since the previous batch (the same share of the step
                                     waiting for data however fast or busy the machine is).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Optional, Tuple


@dataclass(frozen=True)
class Faults:
    kill: Optional[Tuple[int, int]] = None  # (rank, step)
    nan: Optional[Tuple[Optional[int], int]] = None  # (rank or None = all, step)
    kill_in_ckpt: Optional[int] = None  # step
    slow_loader: float = 0.0  # seconds added to every batch's wait (or, with slow_relative, a factor)
    slow_relative: bool = False  # slow_loader x the time since the previous batch was handed over
    _handed: list = field(default_factory=list, compare=False, repr=False)  # when the last batch went out

    @classmethod
    def from_env(cls, env=os.environ) -> "Faults":
        def pair(name: str, rank_optional: bool):
            raw = env.get(name, "").strip()
            if not raw:
                return None
            try:
                parts = [int(x) for x in raw.split(":")]
            except ValueError:
                parts = []
            if len(parts) == 2 or (rank_optional and len(parts) == 1):
                return (parts[0], parts[1]) if len(parts) == 2 else (None, parts[0])
            raise ValueError(f"{name}={raw!r}: expected {'[RANK:]STEP' if rank_optional else 'RANK:STEP'}")

        first_attempt = env.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        kill = pair("TUBELET_FAULT_KILL", False)
        in_ckpt = pair("TUBELET_FAULT_KILL_IN_CKPT", True)
        slow = env.get("TUBELET_FAULT_SLOW_LOADER", "").strip()
        relative = slow.lower().endswith("x")
        try:
            slow_s = float((slow[:-1] if relative else slow) or 0)
        except ValueError:
            raise ValueError(f"TUBELET_FAULT_SLOW_LOADER={slow!r}: expected seconds or a factor (2x)") from None
        return cls(kill=kill if first_attempt else None, nan=pair("TUBELET_FAULT_NAN", True),
                   kill_in_ckpt=in_ckpt[1] if in_ckpt and first_attempt else None, slow_loader=slow_s, slow_relative=relative)

    def maybe_kill(self, rank: int, step: int) -> None:
        if self.kill == (rank, step):
            print(f"[fault injection] rank {rank}: SIGKILL at step {step}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    def delay_batch(self) -> None:
        if not self.slow_loader:
            return
        if not self.slow_relative:
            time.sleep(self.slow_loader)
            return
        if self._handed:  # the first batch has no step before it to be slower than
            time.sleep(self.slow_loader * (time.monotonic() - self._handed[-1]))
        self._handed[:] = [time.monotonic()]

    def nan_at(self, rank: int, step: int) -> bool:
        return self.nan is not None and self.nan[1] == step and self.nan[0] in (None, rank)

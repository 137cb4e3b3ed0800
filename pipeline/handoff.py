"""DALI's GPU output handed to torch on the rank's own GPU, without the host ever waiting for training work.

One `CudaHandoff` per loader, on the loader's device (cuda:local_rank, never the process's current device):

- the copy out of DALI's buffer, and the conversion to the training dtype, run on a stream of their own, in
  memory allocated while that stream is current, so the caching allocator never hands the copy a block that
  work queued on the training stream may still use;
- the training (current) stream waits for the copy on the device (`wait_stream`), and the clips are recorded as
  used by it (`record_stream`): their block is not reused before the training work that reads it has run;
- DALI may reuse an output's memory from its next `run()` on, so the output is kept until its copy has run: the
  host waits for that copy's event just before the next `run()` (a step later, normally long done), never for
  the training stream.

`cuda` and `empty` are torch.cuda and torch.empty; tests pass recorders to check the order of these calls on a
machine without a GPU.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch


class CudaHandoff:
    def __init__(self, device: torch.device, cuda=torch.cuda, empty: Callable = torch.empty):
        if device.type != "cuda" or device.index is None:
            raise ValueError(f"CudaHandoff needs an explicit GPU (cuda:N), got {device}")
        self.device, self._cuda, self._empty = device, cuda, empty
        self.stream = cuda.Stream(device)
        self._pending: Optional[Tuple[object, object]] = None  # (copy done event, the DALI output it reads)

    def before_run(self) -> None:
        """Call before the pipeline's next run(), and before the pipeline is deleted: waits (on the host) for the
        last copy out of DALI's output to have run, then lets DALI have that output back."""
        if self._pending is not None:
            self._pending[0].synchronize()
            self._pending = None

    def to_torch(self, out, dtype: torch.dtype, fp32: bool, feed: Callable) -> torch.Tensor:
        """DALI's batch output `out` (a GPU TensorList) -> a torch tensor of `dtype` on the device, ready for the
        current stream. fp32: DALI produced float32 (else float16). feed: DALI's `feed_ndarray`."""
        t = out.as_tensor()
        consumer = self._cuda.current_stream(self.device)
        with self._cuda.stream(self.stream):
            buf = self._empty(t.shape(), dtype=torch.float32 if fp32 else torch.float16, device=self.device)
            feed(t, buf, cuda_stream=self.stream)
            clips = buf.to(dtype)  # the same tensor when the dtypes agree
            done = self._cuda.Event()
            done.record(self.stream)
        consumer.wait_stream(self.stream)
        clips.record_stream(consumer)
        self._pending = (done, out)
        return clips

"""`NoHostSync`: a TorchDispatchMode that fails on every operation that would make the host wait for a GPU.

It sees what torch runs below Python (a 0-d tensor turned into a Python number inside a C++ call, as a foreach
op's scalar weight, is an `aten._local_scalar_dense` there), so it catches host reads that patching
`Tensor.item` cannot. What it refuses:

- reading a value on the host: `_local_scalar_dense` (`.item()`, `bool()`, `float()`, a tensor passed where a
  number is expected), `equal`;
- ops whose output size depends on the values (`nonzero`, `masked_select`, `unique`, ...): they sync on a GPU;
- device-to-host copies, and host-to-device copies that are blocking or from pageable (unpinned) memory;
- tensors made from Python data (`torch.tensor(list, ...)`, `aten.lift_fresh`): on a GPU a pageable copy.

On the CPU the last three cannot all show (every tensor is on the host), but the first two and the tensors
from Python data do: the CPU tests catch those, the GPU tests (tests/test_gpu.py) the rest.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

HOST_READS = {aten._local_scalar_dense.default, aten.equal.default}
DATA_DEPENDENT = {aten.nonzero.default, aten.masked_select.default, aten._unique2.default, aten.unique_dim.default,
                  aten.unique_consecutive.default, aten.repeat_interleave.Tensor}


class HostSync(AssertionError):
    pass


def _device(x) -> str:
    return x.device.type if isinstance(x, torch.Tensor) else "cpu"


class NoHostSync(TorchDispatchMode):
    """with NoHostSync(): ... raises HostSync naming the op. `allow_python_data`: accept `torch.tensor(...)`."""

    def __init__(self, allow_python_data: bool = False):
        super().__init__()
        self.allow_python_data = allow_python_data

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in HOST_READS:
            raise HostSync(f"{func} reads a tensor's value on the host")
        if func in DATA_DEPENDENT:
            raise HostSync(f"{func}: its output size depends on the values (a GPU sync)")
        if func is aten.lift_fresh.default and not self.allow_python_data:
            raise HostSync("a tensor made from Python data (torch.tensor): on a GPU, a blocking copy from pageable "
                           "memory")
        if func is aten._to_copy.default:
            self._copy(args[0], kwargs.get("device") or args[0].device, kwargs.get("non_blocking", False), func)
        elif func is aten.copy_.default:
            self._copy(args[1], args[0].device, args[2] if len(args) > 2 else kwargs.get("non_blocking", False),
                       func)
        return func(*args, **kwargs)

    @staticmethod
    def _copy(src, dst_device, non_blocking: bool, func) -> None:
        dst = torch.device(dst_device).type
        if _device(src) != "cpu" and dst == "cpu":
            raise HostSync(f"{func}: a device-to-host copy")
        if _device(src) == "cpu" and dst != "cpu" and not (non_blocking and src.is_pinned()):
            raise HostSync(f"{func}: a host-to-device copy that blocks (pageable memory or non_blocking=False)")

"""Peak memory of tensors on the CPU, where torch.cuda's counters do not exist: every tensor an
operation makes (autograd's backward included) is counted from its creation until its storage is
freed. Tensors made before the count started (the weights) are not counted."""

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class TensorBytes(TorchDispatchMode):
    """`live`: bytes of the storages made inside and still alive; `peak`: the most at once."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.sizes = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key in self.sizes or key in inputs or storage.nbytes() == 0:
                    continue  # a view, or an in-place result: no new memory
                self.sizes[key] = storage.nbytes()
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._freed, key)
        return out

    def _freed(self, key):
        self.live -= self.sizes.pop(key)

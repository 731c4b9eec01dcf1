"""Reading a device value on the host without waiting for the work queued after it."""

from __future__ import annotations

import torch


class HostCopy:
    """``tensor``'s values on their way to the host: the copy starts now, ``tolist`` reads it.

    ``int(t)`` or ``t.tolist()`` of a CUDA tensor synchronises the whole stream:
    it waits for every kernel queued so far, also those queued after ``t`` was
    computed. A decoder that queues its next forward before reading this step's
    token, so that the device works while the host does its bookkeeping, would
    then wait for that forward too, and the device would idle while the host
    queued the one after. Here the copy goes into pinned memory on the stream,
    behind the kernels that compute ``tensor`` and ahead of anything queued
    later, and ``tolist`` waits for an event recorded right after it: for this
    value, not for the work behind it. On the CPU the values are simply there.
    """

    def __init__(self, tensor: torch.Tensor) -> None:
        if tensor.is_cuda:
            self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self._host.copy_(tensor, non_blocking=True)
            self._copied: torch.cuda.Event | None = torch.cuda.Event()
            # The stream the copy was queued on: the tensor's device's current stream (a plain
            # record() would take the current device's, which may be another GPU's, idle).
            self._copied.record(torch.cuda.current_stream(tensor.device))
        else:
            self._host, self._copied = tensor.clone(), None  # a snapshot, as on the GPU

    def tolist(self) -> list:
        """The values, once the copy has landed (blocks until it has, not longer)."""
        if self._copied is not None:
            self._copied.synchronize()
        return self._host.tolist()

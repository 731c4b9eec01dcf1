"""A step's token read on the host waits for that token, not for the step queued behind it."""

from __future__ import annotations

import pytest
import torch

from decoders.host_copy import HostCopy


def test_cpu_values_are_read_as_they_are():
    assert HostCopy(torch.tensor([3, 1, 4])).tolist() == [3, 1, 4]


@pytest.mark.gpu
def test_the_read_returns_before_work_queued_after_the_copy():
    if not torch.cuda.is_available():
        pytest.fail("the gpu tests need a CUDA device")
    token = torch.arange(5, device="cuda") * 7
    read = HostCopy(token)
    token.zero_()  # queued after the copy: must not show in what was read
    torch.cuda._sleep(2_000_000_000)  # about a second of device time, queued behind the copy
    queued_after = torch.cuda.Event()
    queued_after.record()
    assert read.tolist() == [0, 7, 14, 21, 28]
    # The value arrived while the sleep still ran; a plain ``token.tolist()`` here would have
    # waited for it (and read zeros).
    assert not queued_after.query()
    torch.cuda.synchronize()
    assert token.tolist() == [0] * 5

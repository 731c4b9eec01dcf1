"""A step's token read on the host waits for that token, not for the step queued behind it."""

from __future__ import annotations

import pytest
import torch

from decoders.host_copy import HostCopy


def test_cpu_values_are_read_as_they_were_when_the_copy_was_made():
    token = torch.tensor([3, 1, 4])
    read = HostCopy(token)
    token.zero_()
    assert read.tolist() == [3, 1, 4]


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


@pytest.mark.gpu
def test_a_copy_queued_on_a_side_stream_is_waited_for_there():
    if not torch.cuda.is_available():
        pytest.fail("the gpu tests need a CUDA device")
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # the copy lands only after this, on the side stream
        token = torch.arange(4, device="cuda") + 1
        read = HostCopy(token)
    assert read.tolist() == [1, 2, 3, 4]
    torch.cuda.synchronize()


@pytest.mark.gpu
def test_a_tensor_on_another_gpu_than_the_current_one_is_read_once_copied():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    with torch.cuda.device(0):
        with torch.cuda.device(1):
            torch.cuda._sleep(200_000_000)  # on GPU 1's stream, ahead of the copy
        token = torch.arange(4, device="cuda:1") + 5
        read = HostCopy(token)
        assert read.tolist() == [5, 6, 7, 8]

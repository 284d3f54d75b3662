"""The parity harness itself: poisoned outputs and the guards around them catch what they claim."""
import pytest
import torch

from liquiddiff.kernels import _tensors
from tests import parity


@pytest.mark.parametrize("past", ["end", "start"])
def test_a_store_past_a_buffer_fails_the_check(past):
    with pytest.raises(AssertionError, match=f"stored 3 elements {'after' if past == 'end' else 'before'} a buffer"):
        with parity.poisoned_outputs():
            out = _tensors.empty_activation(torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last),
                                            torch.float32)
            assert out.isnan().all() and out.is_contiguous(memory_format=torch.channels_last)
            # What a kernel with a loose mask does: three elements just outside the buffer.
            offset = out.storage_offset() + (out.numel() if past == "end" else -3)
            out.as_strided((3,), (1,), offset).fill_(1.0)


def test_untouched_guards_pass_and_poisoning_ends():
    with parity.poisoned_outputs():
        buf = _tensors.empty_buffer((4, 6), torch.float64, torch.device("cpu"))
        buf.fill_(2.0)
    assert not _tensors.poison_outputs and not _tensors.guarded
    assert not _tensors.empty_buffer((4, 6), torch.float64, torch.device("cpu")).storage_offset()

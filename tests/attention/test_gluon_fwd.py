"""Host-side addressing of the Gluon forward (attention/gluon_fwd.py), on the CPU: the
kernel itself runs only on Hopper (test_gluon_fwd_gpu.py)."""

import pytest
import torch

gluon_fwd = pytest.importorskip("modelaccel.attention.gluon_fwd")


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("shape", [(2, 5, 3, 8), (1, 7, 4, 16), (3, 1, 2, 8)])
def test_row_view_finds_every_position(layout, shape):
    batch, seqlen, heads, headdim = shape
    t = torch.randn(shape)
    if layout == "bhsd":
        t = t.transpose(1, 2).contiguous().transpose(1, 2)
    view, rows_b, rows_h, cols_h = gluon_fwd._row_view(t)
    assert view.data_ptr() == t.data_ptr()
    for b in range(batch):
        for h in range(heads):
            for s in range(seqlen):
                row, col = b * rows_b + h * rows_h + s, h * cols_h
                assert torch.equal(view[row, col:col + headdim], t[b, s, h])


def test_row_view_refuses_other_layouts():
    t = torch.randn(2, 6, 4, 8)
    assert gluon_fwd._row_view(t[:, ::2]) is None  # strided sequence
    assert gluon_fwd._row_view(t[:, :, :2]) is None  # some heads of a bshd tensor: rows have gaps
    assert gluon_fwd._row_view(t.transpose(-1, -2)) is None  # headdim not contiguous


def test_fast_launch_keys_gluon_descriptors_by_what_specializes_them():
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from modelaccel.attention.launch import _arg_key

    t = torch.randn(256, 128).to(torch.bfloat16)
    layout = gluon_fwd._shared_layout((64, 128), torch.bfloat16)
    key = _arg_key(TensorDescriptor.from_tensor(t, [64, 128], layout))
    assert hash(key) == hash(_arg_key(TensorDescriptor.from_tensor(t.clone(), [64, 128], layout)))
    other_block = _arg_key(TensorDescriptor.from_tensor(t, [128, 128], gluon_fwd._shared_layout((128, 128),
                                                                                                 torch.bfloat16)))
    other_shape = _arg_key(TensorDescriptor.from_tensor(t[:192], [64, 128], layout))
    assert len({key, other_block, other_shape}) == 3

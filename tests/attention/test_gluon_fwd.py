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

"""The persistent Gluon backward's host-side tile deal (gluon_bwd._tile_schedule), on the CPU."""
import pytest
import torch

gluon_bwd = pytest.importorskip("modelaccel.attention.gluon_bwd")


def predicted_work(t, batch, nheads_k, n_nblocks, seqlen_q, seqlen_k, group, block_q, causal, launch_group):
    start_n = gluon_bwd._host_tile_position(t, batch * nheads_k, n_nblocks, launch_group)[1] * 128
    lo = (max(start_n - seqlen_k + seqlen_q, 0) // block_q) * block_q if causal else 0
    return group * max(seqlen_q - lo, 0) + gluon_bwd._TILE_OVERHEAD_ROWS


@pytest.mark.parametrize("batch, nheads_k, seqlen_q, seqlen_k, group, block_q, causal, launch_group, programs", [
    (16, 16, 1024, 1024, 1, 32, True, 8, 132),
    (8, 16, 2048, 2048, 1, 64, True, 8, 132),
    (2, 8, 8192, 8192, 4, 32, True, 8, 132),
    (5, 2, 700, 700, 2, 32, False, 3, 7),
    (1, 4, 300, 1500, 4, 64, True, 0, 5),
])
def test_every_tile_dealt_once_in_launch_order_and_loads_balanced(batch, nheads_k, seqlen_q, seqlen_k, group,
                                                                  block_q, causal, launch_group, programs):
    n_nblocks = -(-seqlen_k // 128)
    n_tiles = batch * nheads_k * n_nblocks
    schedule = gluon_bwd._tile_schedule(batch, nheads_k, n_nblocks, seqlen_q, seqlen_k, group, block_q, causal,
                                        launch_group, programs, torch.device("cpu")).tolist()
    offsets, table = schedule[:programs + 1], schedule[programs + 1:]
    assert offsets[0] == 0 and offsets[-1] == n_tiles and sorted(table) == list(range(n_tiles))
    work = [predicted_work(t, batch, nheads_k, n_nblocks, seqlen_q, seqlen_k, group, block_q, causal, launch_group)
            for t in range(n_tiles)]
    loads = []
    for p in range(programs):
        tiles = table[offsets[p]:offsets[p + 1]]
        assert tiles == sorted(tiles) and tiles, "each program runs its tiles in launch order, and has some"
        loads.append(sum(work[t] for t in tiles))
    # List scheduling ends within one tile of the mean load.
    assert max(loads) <= sum(loads) / programs + max(work)


def test_schedule_is_cached_per_problem():
    args = (2, 2, 4, 512, 512, 1, 32, True, 8, 5, torch.device("cpu"))
    assert gluon_bwd._tile_schedule(*args) is gluon_bwd._tile_schedule(*args)


def test_no_table_is_made_while_a_cuda_graph_is_captured(monkeypatch):
    # The table's copy to the GPU would only run at replay; the launcher falls back to the
    # snake deal for that call, and a table made before the capture is still used.
    made = (3, 2, 4, 512, 512, 1, 32, True, 8, 5)
    gluon_bwd._tile_schedule(*made, torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    cuda = torch.device("cuda", 0)
    assert gluon_bwd._tile_schedule(4, 2, 4, 512, 512, 1, 32, True, 8, 5, cuda) is None
    cached = object()
    monkeypatch.setitem(gluon_bwd._schedules, made + (cuda,), cached)
    assert gluon_bwd._tile_schedule(*made, cuda) is cached

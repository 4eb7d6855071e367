"""examples/plug_into_your_model.py: fp8 + moe_comm + dualpipe on torch's own transformer blocks trains."""

from tests.distributed import run_ranks


def test_plug_into_your_model_trains_on_4_ranks():
    from examples import plug_into_your_model as plug

    out = run_ranks(plug.main_rank, plug.PP * plug.EP)
    for losses in (out[0], out[1]):  # pipeline rank 0 of each EP rank holds the last stage (the V)
        assert len(losses) == plug.STEPS
        assert losses[-1] < 0.25 * losses[0], losses  # the token map is learned: ~4.2 -> < 0.1
    assert out[2] == [] and out[3] == []

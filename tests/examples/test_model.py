"""The example model in one process: parameter counts, stage split, data, layout checks (fast)."""

import pytest
import torch

from examples.deepseek_v3.config import get_preset
from examples.deepseek_v3.data import TokenCorpus, shard_rows
from examples.deepseek_v3.layout import ConfigError, Layout, check_layout
from examples.deepseek_v3.model import build_model, layer_ranges, lm_loss, param_counts, split_stages


def test_v3_671b_param_count_on_meta():
    c = param_counts(get_preset("v3-671b"))
    # DeepSeek-V3 report: 671B total, 37B activated per token (MTP's 14B, with its own embedding and
    # head, counted apart). The published figures are rounded: total within 0.5%, active within 2%.
    assert abs(c["total"] / 671e9 - 1) < 0.005, c
    assert abs(c["active"] / 37e9 - 1) < 0.02, c
    # ANCHORS.md: 250 GFLOPs/token = 6 x 36.6B active matmul parameters + attention.
    assert abs(c["active_matmul"] / 36.6e9 - 1) < 0.01, c
    assert 10e9 < c["mtp"] < 14e9, c


@pytest.mark.parametrize("num_stages", [2, 4])
def test_stages_compose_to_the_whole_model(num_stages):
    cfg = get_preset("tiny")
    model = build_model(cfg, seed=3)
    tokens = torch.randint(0, cfg.vocab_size, (3, 37), generator=torch.Generator().manual_seed(0))
    whole = model(tokens)
    stages = split_stages(model, layer_ranges(cfg.n_layers, num_stages))
    x = (tokens,)
    for s in range(num_stages):
        x = stages[s](*x)
    assert len(x) == 1 + cfg.mtp_depth and x[1].shape == (3, 36, cfg.vocab_size)
    for a, b in zip(whole, x):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    names = {n for st in stages.values() for n, _ in st.named_parameters()}
    assert names == {n for n, _ in model.named_parameters()}  # global names kept, nothing lost


def test_loss_starts_near_uniform_and_trains():
    cfg = get_preset("tiny")
    model = build_model(cfg, seed=0)
    corpus = TokenCorpus.load(None, cfg.vocab_size)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(25):
        batch = corpus.global_batch(step, 4, 32, seed=1)
        loss = lm_loss(*model(batch[:, :-1]), targets=batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    uniform = torch.log(torch.tensor(256.0)).item() * (1 + 0.3)
    assert abs(losses[0] - uniform) < 0.3, losses[0]
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0, losses


def test_data_is_layout_independent_and_deterministic():
    corpus = TokenCorpus.load(None, 256)
    a = corpus.global_batch(5, 8, 16, seed=2)
    assert torch.equal(a, corpus.global_batch(5, 8, 16, seed=2))
    assert not torch.equal(a, corpus.global_batch(6, 8, 16, seed=2))
    assert torch.equal(torch.cat([shard_rows(a, s, 4) for s in range(4)]), a)
    assert a.shape == (8, 17) and a.dtype == torch.int64
    with pytest.raises(ValueError, match="divisible"):
        shard_rows(a, 0, 3)


def test_token_file_vocab_check(tmp_path):
    import numpy as np

    p = tmp_path / "toks.npy"
    np.save(p, np.array([1, 2, 300] * 100, dtype=np.int32))
    with pytest.raises(ValueError, match="token id 300 >= model vocab_size=256"):
        TokenCorpus.load(p, 256)
    assert TokenCorpus.load(p, 512).train.dtype == torch.int64


@pytest.mark.parametrize(
    "layout, world, match",
    [
        (
            Layout(pp=2, ep=2),
            3,
            r"parallel.pp=2 x parallel.dp=1 x parallel.ep=2 = 4 must equal the world size 3",
        ),
        (Layout(ep=3), 3, r"model.n_routed_experts=8 must be divisible by parallel.ep=3"),
        (
            Layout(pp=4, schedule="dualpipev", num_chunks=8),
            4,
            r"n_layers=4 must be divisible by the 8 pipeline",
        ),
        (
            Layout(pp=2, schedule="dualpipev", num_chunks=2),
            2,
            r"num_microbatches=2 must be an int >= 4",
        ),
        (Layout(pp=2, schedule="zb", num_chunks=4), 2, r"parallel.schedule='zb' must be one of"),
        (Layout(dp=2, num_chunks=3), 2, r"train.batch_size=8 must be divisible"),
    ],
)
def test_bad_layout_raises_config_error(layout, world, match):
    with pytest.raises(ConfigError, match=match):
        check_layout(layout, get_preset("tiny"), world, batch_size=8, seq_len=64)


def test_good_layouts_pass():
    for lay in (
        Layout(pp=2, ep=2),
        Layout(pp=2, schedule="1f1b"),
        Layout(dp=2, ep=2),
        Layout(pp=2, dp=2, ep=2),
    ):
        check_layout(lay, get_preset("tiny"), lay.world_size, batch_size=16, seq_len=64)

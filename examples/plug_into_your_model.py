"""The three primitives on a plain PyTorch model (torch's own nn.TransformerEncoderLayer blocks).

    python -m examples.plug_into_your_model          # 4 local processes (gloo): DualPipeV over 2 x EP 2

fp8: convert_to_fp8 swaps the blocks' nn.Linear for FP8Linear. moe_comm: an expert-parallel MoE layer
after each block (router, this rank's experts, a Dispatcher over the EP group). dualpipe: the model cut
into 4 stages placed as a V over 2 pipeline ranks. Ranks: (pp, ep) = (r // 2, r % 2).
"""

import torch
import torch.distributed as dist
from torch import nn

import fp8
from dualpipe.pipeline import DualPipeV
from examples.deepseek_v3.launch import spawn_local
from moe_comm import DeepSeekV3Router, Dispatcher, GroupedExperts, MoELayer

DIM, VOCAB, EXPERTS, PP, EP, STEPS = 128, 64, 8, 2, 2, 30


class ResidualMoE(nn.Module):
    def __init__(self, ep_group: dist.ProcessGroup):
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        disp = Dispatcher(ep_group, EXPERTS)
        self.moe = MoELayer(
            DeepSeekV3Router(DIM, EXPERTS, 2), GroupedExperts(disp.num_local_experts, DIM, 64), disp
        )

    def forward(self, x):
        return x + self.moe(self.norm(x))


def make_stage(stage: int, ep_group) -> nn.Module:
    """Stage s of 4: [embedding] + an encoder block + an MoE block [+ head]. Same seed on all ranks."""
    torch.manual_seed(stage)
    layers = [nn.Embedding(VOCAB, DIM)] if stage == 0 else []
    layers += [
        nn.TransformerEncoderLayer(DIM, 4, 4 * DIM, dropout=0.0, batch_first=True),
        ResidualMoE(ep_group),
    ]
    layers += [nn.LayerNorm(DIM), nn.Linear(DIM, VOCAB)] if stage == 2 * PP - 1 else []
    # FP8 for the blocks' Linears; the output head (out_features == VOCAB) stays high precision
    return fp8.convert_to_fp8(nn.Sequential(*layers), filter_fn=lambda name, lin: lin.out_features != VOCAB)


def groups(rank: int):
    """The pipeline group and the expert-parallel group of this rank (every rank creates every group)."""
    pp_groups = [dist.new_group([p * EP + e for p in range(PP)]) for e in range(EP)]
    ep_groups = [dist.new_group([p * EP + e for e in range(EP)]) for p in range(PP)]
    return pp_groups[rank % EP], ep_groups[rank // EP]


def main_rank(*_) -> list[float]:
    """Train on this rank (process group already initialised); the losses on the loss ranks."""
    rank = dist.get_rank()
    pp_group, ep_group = groups(rank)
    p = rank // EP
    stages = (make_stage(p, ep_group), make_stage(2 * PP - 1 - p, ep_group))  # the V: stage p and its mirror
    pipe = DualPipeV(stages, process_group=pp_group)
    dense = [q for n, q in pipe.named_parameters() if ".experts." not in n]  # replicated over EP: average
    opt = torch.optim.AdamW(pipe.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(100 + rank % EP)  # each EP rank reads its own data
    losses = []
    for step in range(STEPS):
        x = torch.randint(0, VOCAB, (8, 16), generator=gen)
        y = (3 * x + 1) % VOCAB  # task: a fixed token-to-token map

        def criterion(logits, labels):
            return nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()) / 4

        loss, _ = pipe.step(x, num_chunks=4, criterion=criterion, labels=(y,))
        for q in dense:
            dist.all_reduce(q.grad, group=ep_group)
            q.grad /= EP
        opt.step()
        opt.zero_grad()
        if loss is not None:
            losses.append(loss.sum().item())
            if rank == 0 and step % 5 == 0:
                print(f"step {step}: loss {losses[-1]:.3f}", flush=True)
    return losses


if __name__ == "__main__":
    spawn_local(main_rank, PP * EP, backend="gloo")

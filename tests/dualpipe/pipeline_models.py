"""Tiny deterministic pipeline stages and the single-process reference they are checked against.

A model of S stages; stage s is built from seed 1000 + s, so every process builds identical copies.
Boundaries carry three tensors with their own shapes and dtypes: the hidden state x (b, d) float32, a
side state z (b, 3) float32 that each stage updates from x, and integer ids (b,) int64 that only ride
along (no gradient). The criterion uses x, z and ids.
"""

from __future__ import annotations

import torch
from torch import nn

D = 16


class Stage(nn.Module):
    def __init__(self, s: int, d: int = D):
        super().__init__()
        g = torch.Generator().manual_seed(1000 + s)
        self.norm = nn.LayerNorm(d)
        self.fc1, self.fc2, self.side = nn.Linear(d, 2 * d), nn.Linear(2 * d, d), nn.Linear(d, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() > 1 else 0.1))

    def forward(self, x, z, ids):
        h = x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x))))
        z = z + torch.tanh(self.side(h)) * (1 + (ids % 3).unsqueeze(1).to(z.dtype))
        return h, z, ids


def criterion(x, z, ids, y):
    return (((x - y) ** 2).mean(1) * (1 + ids % 2)).mean() + 0.1 * (z**2).mean()


def batch(n: int = 13, seed: int = 7):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g)
    z = torch.randn(n, 3, generator=g)
    ids = torch.randint(0, 100, (n,), generator=g)
    y = torch.randn(n, D, generator=g)
    return x, z, ids, y


def reference(num_stages: int, num_chunks: int, n: int = 13, seed: int = 7):
    """Per-micro-batch losses and every stage's gradients of a single-process run."""
    stages = [Stage(s) for s in range(num_stages)]
    x, z, ids, y = batch(n, seed)
    losses = []
    for xm, zm, im, ym in zip(*(torch.tensor_split(t, num_chunks) for t in (x, z, ids, y))):
        h = (xm, zm, im)
        for st in stages:
            h = st(*h)
        loss = criterion(*h, ym)
        loss.backward()
        losses.append(loss.detach())
    grads = [{k: p.grad.clone() for k, p in st.named_parameters()} for st in stages]
    return torch.stack(losses), grads


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach() - b).norm() / b.norm().clamp_min(1e-30))


class RollComm:
    """A local stand-in for an all-to-all inside a stage: rolls rows (its adjoint rolls back)."""

    def __init__(self, shift: int):
        self.shift = shift

    def __call__(self, *ts):
        from dualpipe.overlap import Completed

        return Completed(tuple(torch.roll(t, self.shift, 0) for t in ts))


class PiecewiseStage(Stage):
    """The same math shape as Stage but with two communication points (overlap hook)."""

    def forward_pieces(self, x, z, ids):
        from dualpipe.overlap import CommPoint

        a = self.fc1(self.norm(x))
        (a,) = yield CommPoint(RollComm(1), RollComm(-1), (a,), name="dispatch")
        a = self.fc2(torch.nn.functional.gelu(a))
        (a,) = yield CommPoint(RollComm(-1), RollComm(1), (a,), name="combine")
        h = x + a  # x crosses both points without `carry`: still exact
        z = z + torch.tanh(self.side(h)) * (1 + (ids % 3).unsqueeze(1).to(z.dtype))
        return h, z, ids

    def forward(self, x, z, ids):
        from dualpipe.overlap import run_pieces

        return run_pieces(self.forward_pieces(x, z, ids))


def make_stage(s: int, kind: str = "plain", tie_to: int | None = None) -> Stage:
    st = (PiecewiseStage if kind == "piecewise" else Stage)(s)
    if tie_to is not None:  # stages s and tie_to start with the same side.weight
        g = torch.Generator().manual_seed(99)
        with torch.no_grad():
            st.side.weight.copy_(torch.randn(st.side.weight.shape, generator=g) * 0.3)
    return st


def reference_full(num_stages, num_chunks, n=13, seed=7, kind="plain", tie=False, replicas=1):
    """Like ``reference`` with options: piecewise stages, side.weight tied between the first and last
    stage (one shared Parameter), and several DP replicas (seeds seed, seed+1, ...; gradients averaged)."""
    last = num_stages - 1
    stages = [make_stage(s, kind, tie_to=(last if s == 0 else 0) if tie and s in (0, last) else None)
              for s in range(num_stages)]  # fmt: skip
    if tie:
        stages[last].side.weight = stages[0].side.weight
    all_losses = []
    for rep in range(replicas):
        x, z, ids, y = batch(n, seed + rep)
        losses = []
        for xm, zm, im, ym in zip(*(torch.tensor_split(t, num_chunks) for t in (x, z, ids, y))):
            h = (xm, zm, im)
            for st in stages:
                h = st(*h)
            loss = criterion(*h, ym) / replicas
            loss.backward()
            losses.append(loss.detach() * replicas)
        all_losses.append(torch.stack(losses))
    grads = [{k: p.grad.clone() for k, p in st.named_parameters()} for st in stages]
    if tie:
        grads[last]["side.weight"] = grads[0]["side.weight"]
    return all_losses, grads

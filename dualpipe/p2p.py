"""Point-to-point transport of stage boundaries: several tensors of any shape and dtype, discovered at
run time, with bounded waits that name the peer.

An activation message is a fixed-size int64 header (``HEADER_LEN``) followed by one message per
tensor. The header carries the number of tensors, each one's dtype, ``requires_grad`` and shape, plus
a few step fields (``num_chunks``, step counter) that both sides must agree on. The receiver posts the
header receive early (it has a fixed size), and the data receives as soon as the header is in. No
global shape setter: every micro-batch may have its own shapes. Gradients travel back without a
header: the receiving side knows the shapes (it sent the activations).

Tags (gloo matches on them; NCCL ignores them and matches in order) encode (kind, stage, micro-batch,
part) so that messages of one step can never be confused.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

HEADER_LEN = 128
_MAGIC = 0x5DA1
_DTYPES: tuple[torch.dtype, ...] = (
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.complex64,
)
_CODE = {d: i for i, d in enumerate(_DTYPES)}


class PeerError(RuntimeError):
    """A wait on a peer failed or timed out; the message names both pipeline ranks (and global ranks)."""


class BoundaryError(ValueError):
    """A stage boundary that cannot be sent (unsupported dtype, too many tensors or dimensions) or a
    header that disagrees with this rank's step."""


@dataclass(frozen=True)
class Meta:
    shape: tuple[int, ...]
    dtype: torch.dtype
    requires_grad: bool


def encode_header(tensors: Sequence[Tensor], fields: Sequence[int], device: torch.device) -> Tensor:
    """``[magic, len(fields), *fields, n, (dtype, requires_grad, ndim, *shape) per tensor, 0...]``."""
    h = [_MAGIC, len(fields), *fields, len(tensors)]
    for i, t in enumerate(tensors):
        if not isinstance(t, Tensor):
            raise BoundaryError(f"boundary item {i} is a {type(t).__name__}; stage outputs must be tensors")
        if t.dtype not in _CODE:
            raise BoundaryError(f"boundary tensor {i} has dtype={t.dtype}, not one of {list(_CODE)}")
        h += [_CODE[t.dtype], int(t.requires_grad), t.dim(), *t.shape]
    if len(h) > HEADER_LEN:
        raise BoundaryError(
            f"boundary of {len(tensors)} tensors with shapes {[tuple(t.shape) for t in tensors]} needs "
            f"{len(h)} header words > HEADER_LEN={HEADER_LEN}; send fewer tensors or dimensions"
        )
    return torch.tensor(h + [0] * (HEADER_LEN - len(h)), dtype=torch.int64, device=device)


def decode_header(h: Tensor) -> tuple[list[int], list[Meta]]:
    v = h.tolist()
    if v[0] != _MAGIC:
        raise BoundaryError(f"corrupt boundary header (magic {v[0]:#x} != {_MAGIC:#x}): peers out of step?")
    nf = v[1]
    fields = v[2 : 2 + nf]
    i = 2 + nf
    n = v[i]
    i += 1
    metas = []
    for _ in range(n):
        code, rg, nd = v[i : i + 3]
        metas.append(Meta(tuple(v[i + 3 : i + 3 + nd]), _DTYPES[code], bool(rg)))
        i += 3 + nd
    return fields, metas


KIND_F, KIND_B, KIND_X = 0, 1, 2  # activations, gradients, extra exchanges (losses, grad sums)


def make_tag(kind: int, stage: int, mb: int, part: int) -> int:
    if not (0 <= stage < 256 and 0 <= mb < 16384 and 0 <= part < 64):
        raise BoundaryError(f"tag out of range: stage={stage} (<256), mb={mb} (<16384), part={part} (<64)")
    return ((kind * 256 + stage) * 16384 + mb) * 64 + part


class P2P:
    """P2P over one process group with pipeline ranks; every wait is bounded by ``timeout_s``."""

    def __init__(self, group: dist.ProcessGroup | None, timeout_s: float):
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.size = dist.get_world_size(self.group)
        self.timeout_s = float(timeout_s)
        self._global = [dist.get_global_rank(self.group, r) for r in range(self.size)]

    def who(self, r: int) -> str:
        return f"pipeline rank {r} (global rank {self._global[r]})"

    def isend(self, t: Tensor, peer: int, tag: int) -> dist.Work:
        return dist.isend(t, dst=self._global[peer], group=self.group, tag=tag)

    def irecv(self, t: Tensor, peer: int, tag: int) -> dist.Work:
        return dist.irecv(t, src=self._global[peer], group=self.group, tag=tag)

    def wait(self, work: dist.Work, peer: int, what: str, deadline: float | None = None) -> None:
        """Wait for ``work`` at most until ``deadline`` (default: now + timeout); on failure raise
        ``PeerError`` naming this rank, the peer and what was awaited."""
        t0 = time.monotonic()
        limit = (deadline if deadline is not None else t0 + self.timeout_s) - t0
        try:
            ok = work.wait(timeout=timedelta(seconds=max(limit, 0.001)))
        except Exception as e:  # noqa: BLE001 - re-raised with the peer named
            raise PeerError(
                f"{self.who(self.rank)}: {what} with {self.who(peer)} failed after "
                f"{time.monotonic() - t0:.1f}s (timeout {self.timeout_s:.0f}s): {str(e).strip()[:400]}"
            ) from e
        if ok is False:
            raise PeerError(
                f"{self.who(self.rank)}: {what} with {self.who(peer)} did not complete within {limit:.1f}s"
            )


class PendingRecv:
    """An activation receive: the header first (posted at once), then the tensors."""

    def __init__(self, p2p: P2P, peer: int, kind: int, stage: int, mb: int, device: torch.device):
        self.p2p, self.peer, self.kind, self.stage, self.mb = p2p, peer, kind, stage, mb
        self.header = torch.empty(HEADER_LEN, dtype=torch.int64, device=device)
        self.device = device
        self.h_work = p2p.irecv(self.header, peer, make_tag(kind, stage, mb, 0))
        self.data: list[Tensor] | None = None
        self.d_works: list[dist.Work] = []
        self.fields: list[int] = []
        self.metas: list[Meta] = []

    def _what(self) -> str:
        what = "activation" if self.kind == KIND_F else "message"
        return f"receiving the {what} for stage {self.stage} micro-batch {self.mb}"

    def post_data(self) -> None:
        """Called when the header is known to be in: post the data receives."""
        if self.data is not None:
            return
        self.p2p.wait(self.h_work, self.peer, self._what() + " (header)")
        self.fields, self.metas = decode_header(self.header)
        self.data = [torch.empty(m.shape, dtype=m.dtype, device=self.device) for m in self.metas]
        self.d_works = [
            self.p2p.irecv(t, self.peer, make_tag(self.kind, self.stage, self.mb, i + 1))
            for i, t in enumerate(self.data)
        ]

    def poll(self) -> None:
        """Post the data receives if the header already arrived (non-blocking)."""
        if self.data is None and self.h_work.is_completed():
            self.post_data()

    def wait(self) -> tuple[list[int], list[Meta], list[Tensor]]:
        self.post_data()
        deadline = time.monotonic() + self.p2p.timeout_s
        for w in self.d_works:
            self.p2p.wait(w, self.peer, self._what(), deadline)
        return self.fields, self.metas, self.data  # type: ignore[return-value]


def send_boundary(
    p2p: P2P, tensors: Sequence[Tensor], fields: Sequence[int], peer: int, kind: int, stage: int, mb: int
) -> list[tuple[dist.Work, Tensor]]:
    """Send header + tensors without waiting; the caller keeps the (work, tensor) pairs alive until done."""
    device = tensors[0].device if tensors else torch.device("cpu")
    header = encode_header(tensors, fields, device)
    out = [(p2p.isend(header, peer, make_tag(kind, stage, mb, 0)), header)]
    for i, t in enumerate(tensors):
        t = t.detach().contiguous()
        out.append((p2p.isend(t, peer, make_tag(kind, stage, mb, i + 1)), t))
    return out

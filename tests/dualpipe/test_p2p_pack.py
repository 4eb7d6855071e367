"""Boundary packing (``dualpipe.p2p``): one buffer per message, against a plain piece-by-piece fill."""

import torch

from dualpipe.p2p import HEADER_BYTES, Meta, decode_header, header_words, pack, packed_layout, unpack


def _tensors() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    base = torch.randn(5, 3, generator=g)
    return [
        torch.randn(3, 5, generator=g),  # odd shape: 60 bytes, the next piece needs padding
        base.t(),  # not contiguous
        torch.tensor(True),  # 0-dim bool
        torch.randint(-9, 9, (11,), generator=g)[::2],  # strided int64
        torch.randn(7, generator=g).half(),  # 14 bytes
        torch.empty(0, 4),  # empty
        torch.randn(2, 3, generator=g, dtype=torch.complex64),
        torch.randn(9, generator=g).to(torch.float8_e4m3fn),
        torch.randn(3, 3, generator=g).bfloat16(),
        torch.randn(2, 5, generator=g).requires_grad_() * 3,  # part of an autograd graph
    ]


def _reference(tensors, metas, header, base):
    """The plain path: zeros, then every piece copied to its offset."""
    offs, total = packed_layout(metas, base)
    buf = torch.zeros(total, dtype=torch.uint8)
    if header is not None:
        buf[: 8 * len(header)] = torch.tensor(header, dtype=torch.int64).view(torch.uint8)
    for t, o in zip(tensors, offs):
        b = t.detach().contiguous().view(-1).view(torch.uint8)
        buf[o : o + b.numel()] = b
    return buf


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def test_pack_matches_the_plain_fill_and_unpacks_to_the_tensors():
    ts = _tensors()
    metas = [Meta(tuple(t.shape), t.dtype, t.requires_grad) for t in ts]
    fields = [8, 41, 1]
    words = header_words(ts, fields)
    buf = pack(ts, words, torch.device("cpu"))
    assert not buf.requires_grad and buf.dtype == torch.uint8
    assert torch.equal(buf, _reference(ts, metas, words, HEADER_BYTES))
    got_fields, got_metas = decode_header(buf[:HEADER_BYTES].view(torch.int64))
    assert got_fields == fields and got_metas == metas
    assert all(_same(a.contiguous(), b) for a, b in zip(ts, unpack(buf, metas, HEADER_BYTES)))
    # without a header (gradients): the tensors from byte 0
    plain = pack(ts[:3], None, "cpu")
    assert torch.equal(plain, _reference(ts[:3], metas[:3], None, 0))
    assert all(_same(a.contiguous(), b) for a, b in zip(ts[:3], unpack(plain, metas[:3], 0)))
    assert pack([], None, "cpu").numel() == 0

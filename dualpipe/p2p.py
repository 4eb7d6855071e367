"""Point-to-point transport of stage boundaries: several tensors of any shape and dtype, discovered at
run time, with bounded waits that name the peer.

An activation message is one buffer: a fixed-size int64 header (``HEADER_LEN``) and the tensors,
packed. The header carries the number of tensors, each one's dtype, ``requires_grad`` and shape, plus a
few step fields (``num_chunks``, step counter) that both sides must agree on. The receive is posted
early: with the size of the channel's message in the previous step (the steady state: one message per
boundary), or for the header alone the first time and whenever shapes change, the data then following
as a second message. No global shape setter: every micro-batch may have its own shapes, and they may
change between steps. Gradients travel back without a
header, packed into one message: the receiving side knows the shapes (it sent the activations).

Tags (gloo matches on them; NCCL ignores them and matches in order) encode (kind, stage, micro-batch,
part) so that messages of one step can never be confused.
"""

from __future__ import annotations

import math
import os
import queue
import struct
import threading
import time
from collections.abc import Sequence
from datetime import timedelta
from functools import lru_cache
from typing import NamedTuple

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


class Meta(NamedTuple):
    """One boundary tensor's shape, dtype and ``requires_grad`` (a tuple: built and compared in C, a
    few dozen times per pipeline step)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    requires_grad: bool


def header_words(tensors: Sequence[Tensor], fields: Sequence[int]) -> list[int]:
    """``[magic, len(fields), *fields, n, (dtype, requires_grad, ndim, *shape) per tensor]``: the header's
    used words (at most ``HEADER_LEN``; the rest of its ``HEADER_LEN`` words travel as zeros)."""
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
    return h


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


KIND_F, KIND_B, KIND_X, KIND_G = 0, 1, 2, 3  # activations, gradients, extras, coalesced groups


@lru_cache(maxsize=4096)  # a few hundred distinct tags per step, each computed once
def make_tag(kind: int, stage: int, mb: int, part: int) -> int:
    if not (0 <= stage < 256 and 0 <= mb < 16384 and 0 <= part < 64):
        raise BoundaryError(f"tag out of range: stage={stage} (<256), mb={mb} (<16384), part={part} (<64)")
    return ((kind * 256 + stage) * 16384 + mb) * 64 + part


class _Slot:
    """One P2P call handed to the issuer thread: the resulting ``Work`` (or error) once issued."""

    __slots__ = ("work", "error", "ready")

    def __init__(self) -> None:
        self.work: dist.Work | None = None
        self.error: BaseException | None = None
        self.ready = threading.Lock()
        self.ready.acquire()

    def is_completed(self) -> bool:
        return self.error is not None or (self.work is not None and self.work.is_completed())

    def wait(self, timeout: timedelta) -> bool:
        if not self.ready.acquire(blocking=False):  # not issued yet: wait for that, then for the rest
            t0, secs = time.monotonic(), timeout.total_seconds()
            if not self.ready.acquire(timeout=secs):
                raise TimeoutError(f"the P2P call was not even issued within {secs:.1f}s")
            timeout = timedelta(seconds=max(secs - (time.monotonic() - t0), 0.001))
        self.ready.release()  # stays "ready" for any later wait
        if self.error is not None:
            raise self.error
        return self.work.wait(timeout=timeout)  # type: ignore[union-attr]


class _Issuer:
    """A daemon thread that issues P2P calls in order (the C++ call releases the GIL)."""

    def __init__(self, name: str):
        self.q: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            fn, args, slot = item
            try:
                slot.work = fn(*args)
            except BaseException as e:  # noqa: BLE001 - handed to the waiter
                slot.error = e
            finally:
                slot.ready.release()

    def submit(self, fn, *args) -> _Slot:
        slot = _Slot()
        self.q.put((fn, args, slot))
        return slot

    def close(self) -> None:
        self.q.put(None)


def _use_thread(group: dist.ProcessGroup) -> bool:
    env = os.environ.get("FRUGAL_PP_COMM_THREAD")
    if env is not None:
        return env not in ("0", "false", "False")
    return dist.get_backend(group) == "gloo"


class P2P:
    """P2P over one process group with pipeline ranks; every wait is bounded by ``timeout_s``.

    On gloo an ``isend``/``irecv`` call can block its caller for a scheduler quantum while the transport
    thread hands the buffer over (measured: ~2 ms wall, ~40 us CPU per call on a loaded 2-core host).
    The calls are therefore issued by communication threads (one for sends, one for receive posts,
    each in order) per pipeline, and the compute thread never blocks on them
    (``FRUGAL_PP_COMM_THREAD=0|1`` overrides; NCCL calls are asynchronous already and stay inline).
    They call the process group's ``send``/``recv`` directly (group ranks; the GIL is released inside).
    """

    def __init__(self, group: dist.ProcessGroup | None, timeout_s: float):
        self.group = group if group is not None else dist.distributed_c10d._get_default_group()
        self.rank = dist.get_rank(self.group)
        self.size = dist.get_world_size(self.group)
        self.timeout_s = float(timeout_s)
        self._timeout = timedelta(seconds=max(self.timeout_s, 0.001))
        self._global = [dist.get_global_rank(self.group, r) for r in range(self.size)]
        threaded = _use_thread(self.group)
        # gloo's P2P ``Work`` reports completion only once waited: polling its sends is useless there
        self.completes_early = dist.get_backend(self.group) != "gloo"
        # sends and receive posts on separate threads: an urgent send never queues behind a post
        self._sender = _Issuer("dualpipe-send") if threaded else None
        self._poster = _Issuer("dualpipe-recv") if threaded else None

    def who(self, r: int) -> str:
        return f"pipeline rank {r} (global rank {self._global[r]})"

    def isend(self, t: Tensor, peer: int, tag: int):
        if self._sender is None:
            return self.group.send([t], peer, tag)
        return self._sender.submit(self.group.send, [t], peer, tag)

    def irecv(self, t: Tensor, peer: int, tag: int):
        if self._poster is None:
            return self.group.recv([t], peer, tag)
        return self._poster.submit(self.group.recv, [t], peer, tag)

    def close(self) -> None:
        for issuer in (self._sender, self._poster):
            if issuer is not None:
                issuer.close()

    def wait(self, work, peer: int, what: str | tuple, deadline: float | None = None) -> None:
        """Wait for ``work`` at most until ``deadline`` (default: now + timeout); on failure raise
        ``PeerError`` naming this rank, the peer and what was awaited (``what``: a text, or a
        ``(format, *args)`` tuple formatted only for the error)."""
        t0 = time.monotonic()
        if deadline is None:
            limit, td = self.timeout_s, self._timeout
        else:
            limit = deadline - t0
            td = timedelta(seconds=max(limit, 0.001))
        try:
            ok = work.wait(timeout=td)
        except Exception as e:  # noqa: BLE001 - re-raised with the peer named
            raise PeerError(
                f"{self.who(self.rank)}: {_text(what)} with {self.who(peer)} failed after "
                f"{time.monotonic() - t0:.1f}s (timeout {self.timeout_s:.0f}s): {str(e).strip()[:400]}"
            ) from e
        if ok is False:
            raise PeerError(
                f"{self.who(self.rank)}: {_text(what)} with {self.who(peer)} did not complete within "
                f"{limit:.1f}s"
            )


def _text(what: str | tuple) -> str:
    return what if isinstance(what, str) else what[0] % what[1:]


_ALIGN = 16
HEADER_BYTES = HEADER_LEN * 8


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def packed_layout(metas: Sequence[Meta], base: int) -> tuple[list[int], int]:
    """Byte offsets of each tensor after ``base`` bytes (16-byte aligned) and the total size."""
    offs, _, total = _layout(tuple(metas), base)
    return list(offs), total


@lru_cache(maxsize=1024)  # a channel's shapes repeat every step
def _layout(metas: tuple[Meta, ...], base: int) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """``packed_layout`` plus each tensor's size in bytes, cached."""
    offs, sizes, off = [], [], base
    for m in metas:
        off = _align(off)
        offs.append(off)
        sizes.append(math.prod(m.shape) * m.dtype.itemsize)
        off += sizes[-1]
    return tuple(offs), tuple(sizes), _align(off)


def _packed_size(metas: Sequence[Meta], base: int) -> int:
    return _layout(tuple(metas), base)[2]


_ZEROS: dict[torch.device, Tensor] = {}  # per device: HEADER_BYTES zero bytes, sliced for padding


def _zeros(n: int, device: torch.device) -> Tensor:
    z = _ZEROS.get(device)
    if z is None:
        z = _ZEROS[device] = torch.zeros(HEADER_BYTES, dtype=torch.uint8, device=device)
    return z[:n]


def _header_bytes(header: Sequence[int], device: torch.device) -> Tensor:
    """``HEADER_BYTES`` bytes: the header's words (native int64, as an int64 tensor viewed as bytes would
    be) then zeros, built on the host with ``struct`` (a third of ``torch.tensor(words)`` plus padding)."""
    raw = bytearray(HEADER_BYTES)
    struct.pack_into(f"={len(header)}q", raw, 0, *header)
    words = torch.frombuffer(raw, dtype=torch.uint8)
    # to a GPU without a stream sync: a copy from pageable memory is staged at once, so ``raw`` may go
    return words if device.type == "cpu" else words.to(device, non_blocking=True)


def pack(tensors: Sequence[Tensor], header: Sequence[int] | None, device: torch.device | str) -> Tensor:
    """One uint8 buffer: [header (``HEADER_BYTES``)][tensor 0][tensor 1]..., every piece 16-byte aligned
    (the layout of ``packed_layout``), zero padded; ``header``: the words of ``header_words``. One
    concatenation: on a CPU host this costs about a third of filling a buffer piece by piece."""
    if not isinstance(device, torch.device):
        device = torch.device(device)
    pieces: list[Tensor] = []
    off = 0
    if header is not None:
        pieces.append(_header_bytes(header, device))
        off = HEADER_BYTES
    for t in tensors:
        if off % _ALIGN:
            pieces.append(_zeros(_ALIGN - off % _ALIGN, device))
            off = _align(off)
        data = t.detach().contiguous().view(-1).view(torch.uint8)
        pieces.append(data)
        off += data.numel()
    if off % _ALIGN:
        pieces.append(_zeros(_ALIGN - off % _ALIGN, device))
    if not pieces:
        return torch.empty(0, dtype=torch.uint8, device=device)
    return torch.cat(pieces)


def unpack(buf: Tensor, metas: Sequence[Meta], base: int) -> list[Tensor]:
    """Views into ``buf`` (no copy), one per meta."""
    offs, sizes, _ = _layout(tuple(metas), base)
    return [buf[o : o + n].view(m.dtype).view(m.shape) for m, o, n in zip(metas, offs, sizes)]


class PendingRecv:
    """An activation receive, posted early; in the steady state one message per boundary.

    A boundary travels packed: [header][tensors...] in one buffer. If this channel (kind, stage,
    micro-batch) carried a message in an earlier step, the receive is posted at once with that message's
    size (``cache``, which the sender keeps identically). If the shapes changed, or on the first step,
    part 0 carries just the header (padded to the expected size) and the packed data follows on part 1,
    received as soon as the header is in.
    """

    def __init__(
        self,
        p2p: P2P,
        peer: int,
        kind: int,
        stage: int,
        mb: int,
        device: torch.device,
        cache: dict | None = None,
    ):
        self.p2p, self.peer, self.kind, self.stage, self.mb = p2p, peer, kind, stage, mb
        self.key = (kind, stage, mb)
        self.cache = cache if cache is not None else {}
        self.device = device
        self.expected: list[Meta] | None = self.cache.get(self.key)
        size = _packed_size(self.expected, HEADER_BYTES) if self.expected is not None else HEADER_BYTES
        self.buf0 = torch.empty(size, dtype=torch.uint8, device=device)
        self.w0 = p2p.irecv(self.buf0, peer, make_tag(kind, stage, mb, 0))
        self.buf1: Tensor | None = None
        self.w1: dist.Work | None = None
        self.fields: list[int] = []
        self.metas: list[Meta] | None = None
        self.fresh = False

    def _what(self) -> tuple:
        what = "activation" if self.kind == KIND_F else "message"
        return ("receiving the %s for stage %d micro-batch %d", what, self.stage, self.mb)

    def _header(self) -> None:
        """Part 0 is in: decode the header; post part 1 if the data did not come with it."""
        if self.metas is not None:
            return
        self.p2p.wait(self.w0, self.peer, self._what())
        fields, self.metas = decode_header(self.buf0[:HEADER_BYTES].view(torch.int64))
        self.fields, self.fresh = fields[:-1], bool(fields[-1])
        if self.fresh:
            size = _packed_size(self.metas, HEADER_BYTES)
            self.buf1 = torch.empty(size, dtype=torch.uint8, device=self.device)
            self.w1 = self.p2p.irecv(self.buf1, self.peer, make_tag(self.kind, self.stage, self.mb, 1))
        elif self.metas != self.expected:
            raise BoundaryError(
                f"{_text(self._what())}: peer reused shapes {self.metas}, this rank expected {self.expected}"
            )
        self.cache[self.key] = self.metas

    def poll(self) -> None:
        """Post the data receive if the header already arrived alone (non-blocking). Only when this
        channel has no known shapes: otherwise the data normally travels with the header."""
        if self.metas is None and self.expected is None and self.w0.is_completed():
            self._header()

    def wait(self) -> tuple[list[int], list[Meta], list[Tensor]]:
        self._header()
        assert self.metas is not None
        if not self.fresh:
            return self.fields, self.metas, unpack(self.buf0, self.metas, HEADER_BYTES)
        self.p2p.wait(self.w1, self.peer, self._what())  # type: ignore[arg-type]
        return self.fields, self.metas, unpack(self.buf1, self.metas, HEADER_BYTES)  # type: ignore[arg-type]


def send_boundary(
    p2p: P2P,
    tensors: Sequence[Tensor],
    fields: Sequence[int],
    peer: int,
    kind: int,
    stage: int,
    mb: int,
    cache: dict | None = None,
) -> list[tuple[dist.Work, Tensor]]:
    """Send a boundary without waiting; the caller keeps the (work, buffer) pairs alive until done.

    ``cache`` mirrors the receiver's (see ``PendingRecv``): same shapes as the channel's last message
    -> one packed message; otherwise the header alone (at the size the receiver expects) on part 0 and
    the packed data on part 1.
    """
    cache = cache if cache is not None else {}
    key = (kind, stage, mb)
    metas = [Meta(tuple(t.shape), t.dtype, bool(t.requires_grad)) for t in tensors]
    prev = cache.get(key)
    fresh = prev != metas
    device = tensors[0].device if tensors else torch.device("cpu")
    header = header_words(tensors, [*fields, int(fresh)])
    tag0, tag1 = make_tag(kind, stage, mb, 0), make_tag(kind, stage, mb, 1)
    if not fresh:
        buf = pack(tensors, header, device)
        out = [(p2p.isend(buf, peer, tag0), buf)]
    else:
        size = _packed_size(prev, HEADER_BYTES) if prev is not None else HEADER_BYTES
        first = torch.zeros(size, dtype=torch.uint8, device=device)
        first[:HEADER_BYTES] = _header_bytes(header, device)  # the header alone, at the posted size
        data = pack(tensors, header, device)
        out = [(p2p.isend(first, peer, tag0), first), (p2p.isend(data, peer, tag1), data)]
    cache[key] = metas
    return out


class RecvTensors:
    """Receive tensors of known shapes (gradients): one message, packed if there are several."""

    def __init__(self, p2p: P2P, metas: Sequence[Meta], peer: int, tag: int, device: torch.device):
        self.p2p, self.metas, self.peer = p2p, list(metas), peer
        if len(self.metas) == 1:
            m = self.metas[0]
            self.buf = torch.empty(m.shape, dtype=m.dtype, device=device)
        else:
            self.buf = torch.empty(_packed_size(self.metas, 0), dtype=torch.uint8, device=device)
        self.work = p2p.irecv(self.buf, peer, tag) if self.metas else None

    def wait(self, what: str | tuple) -> list[Tensor]:
        if self.work is None:
            return []
        self.p2p.wait(self.work, self.peer, what)
        return [self.buf] if len(self.metas) == 1 else unpack(self.buf, self.metas, 0)


def send_tensors(p2p: P2P, tensors: Sequence[Tensor], peer: int, tag: int) -> list[tuple[dist.Work, Tensor]]:
    """The sending side of ``RecvTensors``."""
    if not tensors:
        return []
    if len(tensors) == 1:
        t = tensors[0].detach().contiguous()
    else:
        t = pack(tensors, None, tensors[0].device)
    return [(p2p.isend(t, peer, tag), t)]

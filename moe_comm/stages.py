"""One all-to-all hop of a dispatch, as index data, in both directions.

Vocabulary. A *row* is one token (or forwarded copy) held by a rank, with ``meta`` (K,) global expert ids
(-1 = slot unused on this path) and ``weights`` (K,) FP32. A *pair* is a (row, k) slot with meta >= 0.
A stage sends each row ONCE to every destination rank that owns one of its pairs (``target`` (n, K) gives
the destination per slot): the destination receives the row with only its own slots kept in the meta.

Dispatch direction (rows):  rows leave peer-major, ascending row within a peer; a receiver therefore
holds its rows source-major, in each source's row order.
Combine direction (pairs):  the receiver returns one output row per pair, in its (row, k) row-major order
(source-major by construction); the sender receives them peer-major and permutes them back to its own
(row, k) row-major pair order with ``pair_inv``. Chaining stages in reverse therefore returns every pair to
the source token in the order (t, k), which is what makes the combine's FP32 sum order fixed.

Two flavours of the same hop:
  DynamicStage  exact sizes; per-peer row counts exchanged first (host synchronisation).
  StaticStage   worst-case capacity: ``capacity`` rows per peer, empty slots marked by meta -1, no count
                exchange and no data-dependent shape anywhere (graph-capturable on CUDA).

Packed rows. The first (dispatch) pass moves payload, meta and weights in ONE collective: each row is a
byte string ``[payload | meta int32 x K | weights fp32 x K]`` padded to 16 bytes. Later passes move plain
tensors (pairs or gradient rows) without metadata: the index plan is reused.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from moe_comm.comm import Comm, Pending
from moe_comm.layout import _membership
from moe_comm.row_ops import gather_rows, stable_argsort

__all__ = ["RowFormat", "DynamicStage", "StaticStage", "padded_rows"]


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True)
class RowFormat:
    """A packed dispatch row: payload bytes, K int32 expert ids, the int32 origin rank, K fp32 weights."""

    payload_bytes: int
    topk: int

    @property
    def meta_offset(self) -> int:
        return _align(self.payload_bytes, 16)

    @property
    def origin_offset(self) -> int:
        return self.meta_offset + 4 * self.topk

    @property
    def weights_offset(self) -> int:
        return self.origin_offset + 4

    @property
    def row_bytes(self) -> int:
        return _align(self.weights_offset + 4 * self.topk, 16)

    def meta(self, buf: torch.Tensor) -> torch.Tensor:
        return buf[:, self.meta_offset : self.origin_offset].view(torch.int32)

    def origin(self, buf: torch.Tensor) -> torch.Tensor:
        return buf[:, self.origin_offset : self.weights_offset].view(torch.int32)[:, 0]

    def weights(self, buf: torch.Tensor) -> torch.Tensor:
        return buf[:, self.weights_offset : self.weights_offset + 4 * self.topk].view(torch.float32)

    def payload(self, buf: torch.Tensor) -> torch.Tensor:
        return buf[:, : self.payload_bytes]

    def new_buffer(self, rows: int, device: torch.device) -> torch.Tensor:
        """(rows + 1, row_bytes) uint8; the extra last row is all zero (the gather target for padding)."""
        buf = torch.empty(rows + 1, self.row_bytes, dtype=torch.uint8, device=device)
        buf[rows].zero_()
        return buf


def padded_rows(like: torch.Tensor, n: int) -> torch.Tensor:
    """(n + 1, *like.shape[1:]) of like's dtype and device; the last row zero (what unused slots gather)."""
    buf = like.new_empty((n + 1, *like.shape[1:]))
    buf[n].zero_()
    return buf


def _rank_within(mask: torch.Tensor) -> torch.Tensor:
    """(n, W) bool -> (n, W) int64: index of each True among the Trues of its column (row order)."""
    return mask.long().cumsum(0) - 1


class DynamicStage:
    """A hop with exact sizes. Build with the rows' ``target`` (n, K) group ranks (-1 = unused)."""

    def __init__(self, comm: Comm, target: torch.Tensor) -> None:
        W = comm.world_size
        self.comm, self.n, self.topk = comm, target.shape[0], target.shape[1]
        self.target = target
        sel = _membership(target, W)  # (n, W): row j goes to peer r
        peer_row = sel.t().nonzero()  # peer-major, ascending row
        self.send_peer, self.send_rows = peer_row[:, 0], peer_row[:, 1]
        self.send_counts = sel.sum(0)
        self.send_splits: list[int] = self.send_counts.tolist()
        self._sel = sel
        tv = target[target >= 0]  # the slots' peers in (row, k) order
        order = stable_argsort(tv)  # pair index for each (peer, row, k)-ordered arrival
        self.pair_inv = torch.empty_like(order)
        self.pair_inv[order] = torch.arange(order.numel(), device=order.device)
        self.num_pairs = tv.numel()
        # (n, K): where pair (row, k) lands in the combine's receive buffer; unused slots read its zero row.
        pair_index = torch.full((self.n * self.topk,), self.num_pairs, dtype=torch.long, device=target.device)
        pair_index[(target >= 0).flatten()] = self.pair_inv
        self.pair_index = pair_index.view(self.n, self.topk)
        self.rev_recv_splits: list[int] = torch.bincount(tv, minlength=W).tolist()
        self.recv_splits: list[int] | None = None  # known after the count exchange
        self.rev_send_splits: list[int] | None = None  # known after the rows arrived

    @functools.cached_property
    def row_slots(self) -> torch.Tensor:
        """Reduced combine: (n, min(K, W)) -- partial (row j, peer r) comes back at the position row j was
        sent to r from; a row's peers in ascending order, unused entries at the appended zero row."""
        W, S, dev = self.comm.world_size, self.send_rows.numel(), self.target.device
        by_peer = torch.full((self.n, W + 1), S, dtype=torch.long, device=dev)
        by_peer[self.send_rows, self.send_peer] = torch.arange(S, device=dev)
        peers = torch.sort(torch.where(self._sel, torch.arange(W, device=dev), W), dim=1).values
        return by_peer.gather(1, peers[:, : min(self.topk, W)])

    # dispatch direction ----------------------------------------------------------------------------
    def pack(
        self,
        fmt: RowFormat,
        payload: torch.Tensor,
        meta: torch.Tensor,
        weights: torch.Tensor,
        origin: torch.Tensor,
    ) -> torch.Tensor:
        """Packed send buffer (S + 1, row_bytes); payload (n, payload_bytes) uint8, meta/weights (n, K)."""
        S = self.send_rows.numel()
        buf = fmt.new_buffer(S, payload.device)
        gather_rows(payload, self.send_rows, out=fmt.payload(buf[:S]))
        mine = self.target.index_select(0, self.send_rows) == self.send_peer[:, None]
        fmt.meta(buf[:S]).copy_(torch.where(mine, meta.index_select(0, self.send_rows), -1))
        fmt.weights(buf[:S]).copy_(torch.where(mine, weights.index_select(0, self.send_rows), 0.0))
        fmt.origin(buf[:S]).copy_(origin.index_select(0, self.send_rows))
        return buf

    def send_packed(self, buf: torch.Tensor, fmt: RowFormat, what: str) -> Pending:
        assert self.recv_splits is not None, "count exchange must complete first"
        R = sum(self.recv_splits)
        if self.comm.is_local:
            return Pending(self.comm, None, buf, what)
        out = fmt.new_buffer(R, buf.device)
        return self.comm.all_to_all(buf[:-1], self.send_splits, self.recv_splits, what, out=out[:R]).then(out)

    def received(self, fmt: RowFormat, recv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """meta (R, K) int64, weights (R, K) fp32, origin (R,) int64 of the rows; sets the combine splits."""
        R = recv.shape[0] - 1
        meta = fmt.meta(recv[:R]).long()
        weights = fmt.weights(recv[:R])
        W = self.comm.world_size
        splits = torch.tensor(self.recv_splits, device=recv.device)
        src = torch.repeat_interleave(torch.arange(W, device=recv.device), splits)
        per_row = (meta >= 0).sum(1)
        self.rev_send_splits = torch.bincount(src, weights=per_row, minlength=W).long().tolist()
        return meta, weights, fmt.origin(recv[:R]).long()

    def forward_rows(self, rows: torch.Tensor, what: str) -> Pending:
        """Send plain rows (n, ...) along the dispatch plan (no metadata); result (R, ...)."""
        send = gather_rows(rows, self.send_rows)
        return self.comm.all_to_all(send, self.send_splits, self.recv_splits, what)

    # combine direction -----------------------------------------------------------------------------
    def reverse_pairs(self, pairs: torch.Tensor, what: str) -> Pending:
        """Pairs in this hop's receiver order, padded (a zero row after them) -> (after wait) the pairs in
        the sender's (row, k) order, padded the same way."""
        out = padded_rows(pairs, self.num_pairs)
        pending = self.comm.all_to_all(pairs[:-1], self.rev_send_splits, self.rev_recv_splits, what)
        return pending.map(lambda got: gather_rows(got, self.pair_inv, out=out[:-1])).then(out)

    def reverse_rows(self, rows: torch.Tensor, what: str) -> Pending:
        """Reduced combine: one row per received row back to its sender -> (buffer + zero row, (n, Kp)
        index of each row's partials, peers ascending)."""
        S = self.send_rows.numel()
        full = rows.new_empty((S + 1, *rows.shape[1:]))
        full[-1].zero_()
        pending = self.comm.all_to_all(rows, self.recv_splits, self.send_splits, what, out=full[:-1])
        return pending.map(lambda _: (full, self.row_slots))

    def reverse_pairs_indexed(self, pairs: torch.Tensor, what: str) -> Pending:
        """Like reverse_pairs, for the source: (received rows + a zero row, (n, K) index into them).

        Local (one rank): the padded pairs are already in the source's order, nothing is copied."""
        if self.comm.is_local:
            return Pending(self.comm, None, (pairs, self.pair_index), what)
        full = padded_rows(pairs, self.num_pairs)
        pending = self.comm.all_to_all(
            pairs[:-1], self.rev_send_splits, self.rev_recv_splits, what, out=full[:-1]
        )
        return pending.map(lambda _: (full, self.pair_index))


class StaticStage:
    """A hop with worst-case capacity: ``capacity`` rows per peer, no count exchange, static shapes."""

    def __init__(self, comm: Comm, target: torch.Tensor, capacity: int, pairs_per_row: int) -> None:
        W = comm.world_size
        n, K = target.shape
        if n > capacity:
            raise ValueError(f"num_tokens={n} exceeds the dispatcher's capacity={capacity} tokens per rank")
        self.comm, self.n, self.topk, self.cap, self.kl = comm, n, K, capacity, pairs_per_row
        self.target = target
        dev = target.device
        sel = _membership(target, W)
        slots = W * capacity
        slot = torch.where(sel, torch.arange(W, device=dev) * capacity + _rank_within(sel), slots)
        rows = torch.arange(n, device=dev)[:, None].expand(n, W)
        self.src_of_slot = torch.zeros(slots + 1, dtype=torch.long, device=dev)
        self.src_of_slot.scatter_(0, slot.flatten(), rows.flatten())
        self.filled = torch.zeros(slots + 1, dtype=torch.bool, device=dev)
        self.filled.scatter_(0, slot.flatten(), True)
        self.src_of_slot, self.filled = self.src_of_slot[:slots], self.filled[:slots]
        self.peer_of_slot = torch.arange(W, device=dev).repeat_interleave(capacity)
        # Combine: pair (t, k) comes back from peer r = target at slot r*cap*kl + row_rank*kl + c, where c
        # counts the earlier slots of the same row going to the same peer.
        same = (target[:, :, None] == target[:, None, :]).tril(-1).sum(-1)  # (n, K) earlier k', same peer
        row_rank = _rank_within(sel).gather(1, target.clamp(min=0))
        flat = (target * capacity + row_rank) * pairs_per_row + same
        # (n*K,) index into the received pair slots; unused slots read the zero row appended at the end.
        self.pair_src = torch.where(target >= 0, flat, slots * pairs_per_row).flatten()

    def pack(
        self,
        fmt: RowFormat,
        payload: torch.Tensor,
        meta: torch.Tensor,
        weights: torch.Tensor,
        origin: torch.Tensor,
    ) -> torch.Tensor:
        S = self.src_of_slot.numel()
        buf = fmt.new_buffer(S, payload.device)
        gather_rows(payload, self.src_of_slot, out=fmt.payload(buf[:S]))
        mine = self.target.index_select(0, self.src_of_slot) == self.peer_of_slot[:, None]
        mine &= self.filled[:, None]
        fmt.meta(buf[:S]).copy_(torch.where(mine, meta.index_select(0, self.src_of_slot), -1))
        fmt.weights(buf[:S]).copy_(torch.where(mine, weights.index_select(0, self.src_of_slot), 0.0))
        fmt.origin(buf[:S]).copy_(origin.index_select(0, self.src_of_slot))
        return buf

    def send_packed(self, buf: torch.Tensor, fmt: RowFormat, what: str) -> Pending:
        if self.comm.is_local:
            return Pending(self.comm, None, buf, what)
        out = fmt.new_buffer(buf.shape[0] - 1, buf.device)
        return self.comm.all_to_all(buf[:-1], None, None, what, out=out[:-1]).then(out)

    def received(self, fmt: RowFormat, recv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        R = recv.shape[0] - 1
        return fmt.meta(recv[:R]).long(), fmt.weights(recv[:R]), fmt.origin(recv[:R]).long()

    def forward_rows(self, rows: torch.Tensor, what: str) -> Pending:
        return self.comm.all_to_all(gather_rows(rows, self.src_of_slot), None, None, what)

    def reverse_pairs_indexed(self, pairs: torch.Tensor, what: str) -> Pending:
        """Padded pair slots (W*cap*kl + 1, ...) at the receiver -> (received slots + a zero row, (n, K)
        index)."""
        index = self.pair_src.view(self.n, self.topk)
        if self.comm.is_local:
            return Pending(self.comm, None, (pairs, index), what)
        full = torch.empty_like(pairs)
        full[-1].zero_()
        pending = self.comm.all_to_all(pairs[:-1], None, None, what, out=full[:-1])
        return pending.map(lambda _: (full, index))

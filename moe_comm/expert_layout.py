"""The expert side of a dispatch: received rows -> tokens grouped by local expert, and back.

Two layouts, both ordered inside an expert by (source rank, source token, k) -- the order a plain
``all_to_all_single`` of one row per (token, expert) pair, followed by a stable sort by expert, produces:

  ContiguousLayout  (sum_e M_e, H): expert e's rows at [m_offsets[e], m_offsets[e] + counts[e]), each
                    group padded with zero rows to a multiple of ``align`` (for grouped GEMMs whose tiles
                    must not straddle experts). Exact sizes: needs host-known counts.
  MaskedLayout      (E_local, capacity, H): expert e's rows at [e, :counts[e]], the rest zero. Static shape
                    (worst case), no host synchronisation; consumed by masked grouped GEMMs.

Both also map the expert outputs back to pairs (``gather_pairs``: the first hop of the combine) and spread
per-pair rows into the layout (``scatter_pairs``: the last step of the combine's backward).
"""

from __future__ import annotations

import torch

from moe_comm.row_ops import gather_rows, stable_argsort
from moe_comm.stages import padded_rows

__all__ = ["ContiguousLayout", "MaskedLayout"]


def _group_positions(key: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """key (P,) in [0, num_groups] (num_groups = invalid). Returns (order, counts (G+1,), rank in group).

    ``rank[p]`` is the number of earlier p' (in index order) with the same key: a stable counting sort.
    """
    order = stable_argsort(key)
    counts = torch.zeros(num_groups + 1, dtype=torch.long, device=key.device)
    counts.scatter_add_(0, key, torch.ones_like(key))
    start = counts.cumsum(0) - counts
    sorted_key = key.index_select(0, order)
    rank = torch.empty_like(key)
    rank[order] = torch.arange(key.numel(), device=key.device) - start.index_select(0, sorted_key)
    return order, counts, rank


class ContiguousLayout:
    """Pairs of the received rows grouped by local expert, contiguous, padded to ``align`` rows."""

    kind = "contiguous"

    def __init__(
        self,
        meta: torch.Tensor,
        weights: torch.Tensor,
        first_expert: int,
        num_local: int,
        align: int,
        row_order: torch.Tensor | None = None,
    ) -> None:
        """meta/weights (R, K) of the received rows; ``row_order`` (R,): the order in which rows appear
        inside each expert (default: as received). Pairs keep the received (row, k) order for the way back.
        """
        R, K = meta.shape
        valid = meta >= 0
        flat = valid.view(-1).nonzero().squeeze(1)  # (P,) slots (row, k), row-major = source-major
        self.pair_row, pair_k = flat // K, flat % K
        local = meta.reshape(-1).index_select(0, flat) - first_expert
        if local.numel():
            lo, hi = torch.aminmax(local)  # one pass, one host synchronisation
            if int(lo) < 0 or int(hi) >= num_local:
                raise RuntimeError(
                    "moe_comm internal error: received expert ids outside this rank's experts "
                    f"[{first_expert}, {first_expert + num_local}) (do peers disagree on num_experts or "
                    "the topology?)"
                )
        self.pair_weights = weights.reshape(-1).index_select(0, flat)
        self.pair_local = local  # (P,) local expert of each pair
        self.valid, self.slot_weights = valid, torch.where(valid, weights, 0.0)
        if row_order is None:
            _, counts, rank = _group_positions(local, num_local)
        else:  # rank each pair by (position of its row in row_order, k)
            row_pos = torch.empty_like(row_order)
            row_pos[row_order] = torch.arange(R, device=meta.device)
            seq = torch.sort(row_pos.index_select(0, self.pair_row) * K + pair_k).indices
            _, counts, rank_seq = _group_positions(local.index_select(0, seq), num_local)
            rank = torch.empty_like(rank_seq)
            rank[seq] = rank_seq
        self.counts = counts[:num_local]
        self.counts_list: list[int] = self.counts.tolist()
        # group offsets (each group padded to ``align``) from the counts just read: on the host, then once
        # to the device
        self.m_offsets_list: list[int] = [0]
        for c in self.counts_list:
            self.m_offsets_list.append(self.m_offsets_list[-1] + (c + align - 1) // align * align)
        self.m_offsets = torch.tensor(self.m_offsets_list, dtype=torch.long, device=meta.device)
        self.num_rows = self.m_offsets_list[-1]
        self.pos = self.m_offsets.index_select(0, local) + rank  # (P,) output row of each pair
        self.src_of_out = torch.full((self.num_rows,), R, dtype=torch.long, device=meta.device)
        self.src_of_out[self.pos] = self.pair_row
        self.num_pairs = self.pos.numel()

    def expand(self, rows_with_zero_row: torch.Tensor) -> torch.Tensor:
        """(R + 1, ...) received rows (last row zero) -> (num_rows, ...) grouped by expert."""
        return gather_rows(rows_with_zero_row, self.src_of_out)

    def check_y(self, y: torch.Tensor) -> None:
        if y.dim() != 2 or y.shape[0] != self.num_rows:
            raise ValueError(
                f"y.shape={tuple(y.shape)}: y.shape[0] must equal the dispatched rows {self.num_rows}"
            )

    def gather_pairs(self, y: torch.Tensor) -> torch.Tensor:
        """(num_rows, H) expert outputs -> (P + 1, H): one row per pair, in received (row, k) order, then a
        zero row (the padding the combine's hops keep, see stages.padded_rows)."""
        self.check_y(y)
        out = padded_rows(y, self.num_pairs)
        gather_rows(y, self.pos, out=out[:-1])
        return out

    def row_partials(self, y: torch.Tensor) -> torch.Tensor:
        """Reduced combine: (R, H) in y's dtype, row i = sum over its pairs, k ascending, in FP32 from 0, of
        weight * y[pair] (rounded to y's dtype once, at the end)."""
        from moe_comm.row_ops import sum_pairs_fp32

        self.check_y(y)
        R, K = self.valid.shape
        index = torch.full((R * K,), -1, dtype=torch.long, device=y.device)
        index[self.valid.flatten()] = self.pos
        return sum_pairs_fp32(y, index.view(R, K), self.slot_weights, y.dtype, unused=-1)

    def pair_dots(self, rows: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(P, 1) FP32: <rows[pair_row], y[pair]> for each pair (d weight of the reduced combine)."""
        g = gather_rows(rows, self.pair_row).float()
        return (g * gather_rows(y, self.pos).float()).sum(-1, keepdim=True)

    def scatter_pairs(self, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Received plain rows (R, H) -> (num_rows, H) = weight of each pair * its row, in ``dtype``."""
        pairs = (gather_rows(rows, self.pair_row).float() * self.pair_weights[:, None]).to(dtype)
        out = pairs.new_zeros((self.num_rows, *rows.shape[1:]))
        return out.index_copy_(0, self.pos, pairs)


class MaskedLayout:
    """Pairs of the received slots in a (num_local, capacity, ...) buffer; ``counts``: rows per expert."""

    kind = "masked"

    def __init__(
        self,
        meta: torch.Tensor,
        weights: torch.Tensor,
        first_expert: int,
        num_local: int,
        capacity: int,
        pairs_per_row: int,
    ):
        R, K = meta.shape
        dev = meta.device
        valid = meta >= 0
        local = torch.where(valid, meta - first_expert, num_local)
        local = torch.where((local < 0) | (local > num_local), num_local, local).flatten()  # (R*K,)
        _, counts, rank = _group_positions(local, num_local)
        self.counts, self.capacity, self.num_local = counts[:num_local], capacity, num_local
        dump = num_local * capacity
        self.pos = torch.where(local < num_local, local * capacity + rank, dump)  # (R*K,)
        self.pair_row = torch.arange(R, device=dev).repeat_interleave(K)
        self.pair_weights = torch.where(valid, weights, 0.0).flatten()
        src = torch.full((dump + 1,), R, dtype=torch.long, device=dev)
        self.src_of_out = src.scatter_(0, self.pos, self.pair_row)[:dump]
        # Pair slots for the way back: slot (row, c), c = index of the pair among its row's valid slots.
        c = valid.long().cumsum(1) - 1
        slot = torch.where(valid, torch.arange(R, device=dev)[:, None] * pairs_per_row + c, R * pairs_per_row)
        ysrc = torch.zeros(R * pairs_per_row + 1, dtype=torch.long, device=dev)
        self.slot_src = ysrc.scatter_(0, slot.flatten(), self.pos.clamp(max=dump - 1))[:-1]
        self.num_rows = dump

    def expand(self, rows_with_zero_row: torch.Tensor) -> torch.Tensor:
        out = gather_rows(rows_with_zero_row, self.src_of_out)
        return out.view(self.num_local, self.capacity, *out.shape[1:])

    def check_y(self, y: torch.Tensor) -> None:
        if y.dim() != 3 or tuple(y.shape[:2]) != (self.num_local, self.capacity):
            raise ValueError(
                f"y.shape={tuple(y.shape)} must be (num_local_experts, capacity, H) with "
                f"(num_local_experts, capacity)=({self.num_local}, {self.capacity})"
            )

    def gather_pairs(self, y: torch.Tensor) -> torch.Tensor:
        """(E_local, capacity, H) -> (R * pairs_per_row + 1, H): the pair slots, then a zero row."""
        self.check_y(y)
        out = padded_rows(y.reshape(self.num_rows, *y.shape[2:]), self.slot_src.numel())
        gather_rows(y.reshape(self.num_rows, *y.shape[2:]), self.slot_src, out=out[:-1])
        return out

    def scatter_pairs(self, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        pairs = (gather_rows(rows, self.pair_row).float() * self.pair_weights[:, None]).to(dtype)
        out = pairs.new_zeros((self.num_rows + 1, *rows.shape[1:]))
        out.index_copy_(0, self.pos, pairs)
        return out[:-1].view(self.num_local, self.capacity, *rows.shape[1:])

"""Dense batches of rows of a sparse users x items matrix, gathered on any device.

A dense users x items matrix does not fit in memory for large data (10x ML-1M is 60k x 28k);
the CSR arrays do. :class:`SparseRows` keeps them as torch tensors on the target device and
builds the dense ``(B, n_items)`` rows of a batch of users with a few vectorised ops, so batches
never round-trip through numpy on a GPU.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch


class SparseRows:
    """Row access to a CSR matrix held as torch tensors on ``device``."""

    def __init__(self, matrix: sp.csr_matrix, device: torch.device | str = "cpu") -> None:
        matrix = sp.csr_matrix(matrix)
        matrix.sort_indices()
        self.shape = matrix.shape
        self.device = torch.device(device)
        self.indptr = torch.from_numpy(matrix.indptr.astype(np.int64)).to(self.device)
        self.indices = torch.from_numpy(matrix.indices.astype(np.int64)).to(self.device)
        self.values = torch.from_numpy(matrix.data.astype(np.float32)).to(self.device)

    @property
    def n_rows(self) -> int:
        return int(self.shape[0])

    @property
    def n_cols(self) -> int:
        return int(self.shape[1])

    def to(self, device: torch.device | str) -> "SparseRows":
        moved = object.__new__(SparseRows)
        moved.shape, moved.device = self.shape, torch.device(device)
        moved.indptr, moved.indices, moved.values = (x.to(device) for x in (self.indptr, self.indices, self.values))
        return moved

    def coordinates(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(batch_row, column, value)`` of every stored entry of ``rows`` (batch positions, not ids)."""
        rows = rows.to(self.device)
        starts, ends = self.indptr[rows], self.indptr[rows + 1]
        lengths = ends - starts
        batch_row = torch.repeat_interleave(torch.arange(len(rows), device=self.device), lengths)
        offsets = torch.arange(int(lengths.sum()), device=self.device) - torch.repeat_interleave(
            torch.cumsum(lengths, 0) - lengths, lengths
        )
        position = torch.repeat_interleave(starts, lengths) + offsets
        return batch_row, self.indices[position], self.values[position]

    def dense(self, rows: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense ``(len(rows), n_cols)`` block of the given row ids."""
        batch_row, column, value = self.coordinates(rows)
        out = torch.zeros(len(rows), self.n_cols, dtype=dtype, device=self.device)
        out[batch_row, column] = value.to(dtype)
        return out

    def row_lengths(self, rows: torch.Tensor) -> torch.Tensor:
        rows = rows.to(self.device)
        return self.indptr[rows + 1] - self.indptr[rows]

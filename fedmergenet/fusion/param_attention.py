"""ParamAttention, MergeNet's parameter adapter (Li et al., arXiv 2404.13322).

The student matrix A (a x b) attends to the teacher matrix B (c x d) along four paths:
rows and columns of A as queries, rows and columns of B as keys and values. The paths are
averaged and passed through a spectral-normalised expansion MLP. Output has A's shape.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm


def path_width(query_dim: int, key_dim: int, heads: int) -> int:
    """Per-head width of one attention path, as in the original: max((da+db)//2, 128)//h."""
    return max((query_dim + key_dim) // 2, 128) // heads


class CrossAttention(nn.Module):
    """Multi-head attention of query vectors over key/value vectors, residual + LayerNorm."""

    def __init__(self, query_dim: int, key_dim: int, heads: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = path_width(query_dim, key_dim, heads)
        inner = heads * self.head_dim
        self.fc_q = nn.Linear(query_dim, inner)
        self.fc_k = nn.Linear(key_dim, inner)
        self.fc_v = nn.Linear(key_dim, inner)
        self.fc_output = nn.Linear(inner, query_dim)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(query_dim, eps=1e-12)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        nq, nk = queries.shape[0], keys.shape[0]
        q = self.fc_q(queries).view(nq, self.heads, self.head_dim).transpose(0, 1)
        k = self.fc_k(keys).view(nk, self.heads, self.head_dim).transpose(0, 1)
        v = self.fc_v(keys).view(nk, self.heads, self.head_dim).transpose(0, 1)
        scores = q @ k.transpose(1, 2) / math.sqrt(self.head_dim)
        attended = self.dropout(torch.softmax(scores, dim=-1)) @ v
        attended = attended.transpose(0, 1).reshape(nq, self.heads * self.head_dim)
        return self.norm(queries + self.fc_output(attended))


class ParamOutput(nn.Module):
    """2x expansion MLP with GELU, dropout, residual and LayerNorm; spectral norm keeps it tame."""

    def __init__(self, dim: int, dropout: float = 0.2) -> None:
        super().__init__()
        self.dense_up = spectral_norm(nn.Linear(dim, 2 * dim))
        self.dense_down = spectral_norm(nn.Linear(2 * dim, dim))
        self.gelu = nn.GELU(approximate="tanh")
        self.dropout = nn.Dropout(dropout)
        self.layernorm = nn.LayerNorm(dim, eps=1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layernorm(self.dropout(self.dense_down(self.gelu(self.dense_up(x)))) + x)


class ParamAttentionLayer(nn.Module):
    def __init__(self, student_shape: tuple[int, int], teacher_shape: tuple[int, int], heads: int) -> None:
        super().__init__()
        (a_rows, a_cols), (b_rows, b_cols) = student_shape, teacher_shape
        # Rows of A (length a_cols) and columns of A (length a_rows) query rows/columns of B.
        self.attention_x_x = CrossAttention(a_cols, b_cols, heads)
        self.attention_x_y = CrossAttention(a_cols, b_rows, heads)
        self.attention_y_x = CrossAttention(a_rows, b_cols, heads)
        self.attention_y_y = CrossAttention(a_rows, b_rows, heads)
        self.output = ParamOutput(a_cols)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a_t, b_t = a.t(), b.t()
        out = (
            self.attention_x_x(a, b)
            + self.attention_x_y(a, b_t)
            + self.attention_y_x(a_t, b).t()
            + self.attention_y_y(a_t, b_t).t()
        ) / 4
        return self.output(out)


class ParamAttention(nn.Module):
    """Stack of ParamAttention layers mapping a student matrix to a new one of the same shape."""

    def __init__(
        self, student_shape: tuple[int, int], teacher_shape: tuple[int, int], heads: int = 8, num_layers: int = 2
    ) -> None:
        super().__init__()
        self.student_shape = tuple(student_shape)
        self.teacher_shape = tuple(teacher_shape)
        self.layers = nn.ModuleList(
            ParamAttentionLayer(self.student_shape, self.teacher_shape, heads) for _ in range(num_layers)
        )

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        out = student
        for layer in self.layers:
            out = layer(out, teacher)
        return out


def as_matrix(weight: torch.Tensor) -> torch.Tensor:
    """A conv weight [out, in, 1, 1] (or any [out, ...]) as the [out, in*...] matrix MergeNet uses."""
    return weight.reshape(weight.shape[0], -1)

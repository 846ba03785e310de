"""Layers that work with optgen's optimizers."""

from __future__ import annotations

import torch
from torch import nn

from optgen.runtime import FP32_STATE_ATTR


class StableEmbedding(nn.Embedding):
    """``nn.Embedding`` with Xavier-uniform init and a LayerNorm on its output (bitsandbytes' StableEmbedding),
    whose weight every optgen optimizer keeps in fp32 optimizer state (the ``optgen_fp32_state`` mark), since
    rare tokens' rows get rare, large updates that 8-bit states represent badly."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *args, **kwargs) -> None:
        super().__init__(num_embeddings, embedding_dim, *args, **kwargs)
        self.norm = nn.LayerNorm(embedding_dim, device=self.weight.device)
        setattr(self.weight, FP32_STATE_ATTR, True)

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.weight)
        self._fill_padding_idx_with_zero()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.norm(super().forward(input))

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
        self._mark_weight()

    def _mark_weight(self) -> None:
        setattr(self.weight, FP32_STATE_ATTR, True)

    # The mark is an attribute of the Parameter object: ``to_empty()`` (meta-device init) and
    # ``load_state_dict(assign=True)`` put a new Parameter in its place, which is marked again here.
    def _apply(self, *args, **kwargs):
        module = super()._apply(*args, **kwargs)
        self._mark_weight()
        return module

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._mark_weight()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.weight)
        self._fill_padding_idx_with_zero()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.norm(super().forward(input))

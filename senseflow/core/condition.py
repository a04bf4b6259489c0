"""Text conditioning of a batch: the :class:`Condition` every family produces and every denoiser call takes."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch
from torch import Tensor


@dataclass
class Condition:
    """Text conditioning of a batch (docs/method.md §12). Tensors are batch-first unless noted.

    * ``prompt_embeds``: SDXL (B, 77, 2048); SD3.5 (B, 154, 4096); FLUX (B, 512, 4096) at full width.
    * ``pooled``: SDXL text_encoder_2 projection (B, 1280); SD3.5 CLIP-L ⊕ CLIP-G projections (B, 2048);
      FLUX CLIP-L pooler output (B, 768).
    * ``time_ids``: SDXL only, (B, 6) = [orig_h, orig_w, crop_top, crop_left, target_h, target_w].
    * ``text_ids``: FLUX only, (seq, 3) zeros, shared by the batch (not batch-first).
    """

    prompt_embeds: Tensor
    pooled: Tensor
    time_ids: Tensor | None = None
    text_ids: Tensor | None = None

    _BATCHED = ("prompt_embeds", "pooled", "time_ids")

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Condition":
        """Move every tensor; ``dtype`` applies to floating tensors only (ids and time ids keep theirs)."""
        return Condition(
            prompt_embeds=self.prompt_embeds.to(device=device, dtype=dtype),
            pooled=self.pooled.to(device=device, dtype=dtype),
            time_ids=None if self.time_ids is None else self.time_ids.to(device=device),
            text_ids=None if self.text_ids is None else self.text_ids.to(device=device),
        )

    def index(self, sel: Tensor | slice | Sequence[int]) -> "Condition":
        """Select samples of the batch."""
        return replace(self, **{n: getattr(self, n)[sel] for n in self._BATCHED if getattr(self, n) is not None})

    def expand(self, batch: int) -> "Condition":
        """Repeat a batch-1 condition ``batch`` times (used for the cached unconditional condition)."""
        if len(self) == batch:
            return self
        if len(self) != 1:
            raise ValueError(f"cannot expand a condition of batch {len(self)} to {batch}")
        return replace(
            self,
            **{
                n: getattr(self, n).expand(batch, *getattr(self, n).shape[1:])
                for n in self._BATCHED
                if getattr(self, n) is not None
            },
        )

    @staticmethod
    def cat(conds: Sequence["Condition"]) -> "Condition":
        """Concatenate along the batch axis (e.g. [uncond, cond] for one CFG forward)."""
        first = conds[0]
        out = {
            n: torch.cat([getattr(c, n) for c in conds]) for n in Condition._BATCHED if getattr(first, n) is not None
        }
        return replace(first, **out)

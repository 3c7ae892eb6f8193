"""Scratch tensors reused from one hook call to the next.

Every hook of one forward pass receives activations of the same shape, and the
statistics need a few scratch tensors of that shape (a float64 copy, bit
patterns, bin indices). Allocating them anew in each call was the largest cost
of the statistics on the CPU: buffers of a few MB are mapped fresh from the
operating system and every page faults on first touch. A ``Workspace`` keeps
one tensor per purpose and hands it out again while shape, dtype and device match.
"""

from __future__ import annotations

import torch


class Workspace:
    """Named scratch tensors, reallocated only when the requested shape, dtype or device changes.

    A tensor handed out under a name is overwritten by the next request for
    that name, so callers must not keep it beyond the current computation.
    """

    def __init__(self) -> None:
        self._tensors: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Return an uninitialised tensor for ``name``, with the last call's storage when nothing changed."""
        tensor = self._tensors.get(name)
        if tensor is None or tensor.shape != tuple(shape) or tensor.dtype != dtype or tensor.device != device:
            tensor = torch.empty(shape, dtype=dtype, device=device)
            self._tensors[name] = tensor
        return tensor

    def clear(self) -> None:
        """Release every tensor."""
        self._tensors.clear()

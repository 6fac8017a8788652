"""Feature map → vector. One function for the tensors, one for their shapes."""

from __future__ import annotations

from collections.abc import Callable

import torch

from featx.errors import UsageError

# What each --pool does to each kind of layer output (batch dimension not shown):
#   [C, H, W]  avg/max → [C]   flatten → [C*H*W]   none → [C, H, W]   cls → refused
#   [T, C]     avg → mean over tokens after the prefix (class) tokens → [C]; cls → token 0 → [C]
#              max → [C]; flatten → [T*C]; none → [T, C]
#   [D]        unchanged whatever --pool says


# (dimensions with the batch, --pool) → the reduction; token outputs skip their prefix tokens.
_POOLS: dict[tuple[int, str], Callable[[torch.Tensor, int], torch.Tensor]] = {
    (4, "avg"): lambda x, prefix: x.mean(dim=(2, 3)),
    (4, "max"): lambda x, prefix: x.amax(dim=(2, 3)),
    (4, "flatten"): lambda x, prefix: x.flatten(1),
    (3, "cls"): lambda x, prefix: x[:, 0],
    (3, "avg"): lambda x, prefix: x[:, prefix:].mean(dim=1),
    (3, "max"): lambda x, prefix: x[:, prefix:].amax(dim=1),
    (3, "flatten"): lambda x, prefix: x.flatten(1),
}


def pool(x: torch.Tensor, how: str, prefix_tokens: int = 0) -> torch.Tensor:
    """Reduce one layer's batched output ``x`` to ``[N, D]`` (or keep it with ``none``).

    Example: ``pool(torch.ones(2, 8, 4, 4), "avg").shape == (2, 8)``
    """
    if x.ndim == 2 or how == "none":
        return x
    reduce = _POOLS.get((x.ndim, how))
    if reduce is None:
        raise UsageError(
            f"--pool {how} does not apply to a layer output of shape {list(x.shape[1:])}"
        )
    return reduce(x, prefix_tokens)


def pooled_shape(shape: tuple[int, ...], how: str, strict: bool = True) -> tuple[int, ...]:
    """The per-image shape ``pool`` produces from a per-image ``shape``.

    With ``strict=False`` an inapplicable pool falls back to flattening (for listings).
    """
    if len(shape) == 1 or how == "none":
        return shape
    if how in ("avg", "max") and len(shape) in (2, 3):
        return (shape[0],) if len(shape) == 3 else (shape[1],)
    if how == "cls" and len(shape) == 2:
        return (shape[1],)
    if how == "flatten" or not strict:
        size = 1
        for value in shape:
            size *= value
        return (size,)
    raise UsageError(f"--pool {how} does not apply to a layer output of shape {list(shape)}")

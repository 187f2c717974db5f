"""A picture of one task, so a user can see at a glance that the data is what they think."""

from __future__ import annotations

import torch

from mamlrun.data.tasks import TaskBatch


def task_grid(batch: TaskBatch, max_query: int = 5, pad: int = 2) -> torch.Tensor:
    """The first task of ``batch`` as a ``[C, H, W]`` image in [0, 1] (images normalised
    outside that range are stretched to it as a whole, so contrasts between them stay true).

    Row ``i`` shows the support images labelled ``i``, a gap, then up to ``max_query`` query
    images labelled ``i``: if the data is right, each row holds one character.
    """
    xs, ys, xq, yq = (t[0].detach().float().cpu() for t in batch)
    low, high = float(min(xs.min(), xq.min())), float(max(xs.max(), xq.max()))
    if low < 0 or high > 1:  # normalised inputs: stretch the task's range into view
        xs, xq = ((x - low) / max(high - low, 1e-8) for x in (xs, xq))
    ways = int(ys.max()) + 1
    c, h, w = xs.shape[1:]
    shots = int((ys == 0).sum())
    cols = shots + 1 + min(max_query, int((yq == 0).sum()))
    grid = torch.ones(c, ways * (h + pad) + pad, cols * (w + pad) + pad) * 0.5
    for label in range(ways):
        row = [*xs[ys == label], None, *xq[yq == label][:max_query]]
        for col, image in enumerate(row):
            if image is None:
                continue
            top, left = pad + label * (h + pad), pad + col * (w + pad)
            grid[:, top : top + h, left : left + w] = image.clamp(0, 1)
    return grid

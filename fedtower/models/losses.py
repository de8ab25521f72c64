"""Losses and negative sampling for the two-tower model.

Per-sample losses (one value per row) so DP code can clip and weight them.
Candidate layout everywhere: column 0 is the positive, columns 1.. negatives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("softmax", "sampled-softmax", "bpr")


def sample_negatives(
    batch: int,
    num_negatives: int,
    num_items: int,
    *,
    positives: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Uniform negatives B x M from the catalogue, each row drawn independently.

    Independent rows keep samples independent (what per-sample DP needs). A
    draw equal to that row's positive is redrawn once, then shifted by one, so
    a negative never equals its own positive.
    """
    if num_items < 2:
        raise ValueError("Negative sampling needs a catalogue of at least 2 items.")
    negatives = torch.randint(num_items, (batch, num_negatives), generator=generator)
    if positives is not None:
        clash = negatives == positives.view(-1, 1)
        if clash.any():
            redraw = torch.randint(num_items, (int(clash.sum()),), generator=generator)
            negatives[clash] = redraw
            clash = negatives == positives.view(-1, 1)
            negatives[clash] = (negatives[clash] + 1) % num_items
    return negatives


def sampled_softmax_loss(scores: torch.Tensor, log_q: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax over [positive, negatives]: scores B x (1 + M) -> per-sample loss B.

    `log_q` (B x (1 + M)) are log sampling probabilities for the logQ correction;
    with uniform negatives it is a constant and can be left out.
    """
    if log_q is not None:
        scores = scores - log_q
    return -F.log_softmax(scores, dim=-1)[:, 0]


def bpr_loss(scores: torch.Tensor) -> torch.Tensor:
    """Bayesian personalised ranking: mean over negatives of -log sigmoid(pos - neg) -> B."""
    return -F.logsigmoid(scores[:, :1] - scores[:, 1:]).mean(-1)


def candidate_loss(name: str, scores: torch.Tensor) -> torch.Tensor:
    if name == "sampled-softmax":
        return sampled_softmax_loss(scores)
    if name == "bpr":
        return bpr_loss(scores)
    raise ValueError(f"Unknown candidate loss {name!r}; choose 'sampled-softmax' or 'bpr'.")

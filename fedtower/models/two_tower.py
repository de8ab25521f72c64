"""The two-tower model: a shared ItemTower and a private UserTower.

Only the item tower ever leaves a client; its parameters all live under the
`item_tower.` prefix so the split is by name. The user tower holds one free
embedding per local user and pools the user's recent history through the
item tower, so a new user gets a useful vector from a handful of events.

Opacus-safe by construction: no BatchNorm, and each embedding layer is called
exactly once per forward (history and candidate ids are concatenated first).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

ITEM_TOWER_PREFIX = "item_tower."
POOLINGS = ("mean", "attention")
PAD = -1  # history padding id


@dataclass
class TwoTowerConfig:
    num_items: int
    num_users: int = 0  # rows of the private free user table; 0 = history pooling only
    dim: int = 128
    content_dim: int = 0  # dense content features per item; 0 = id embedding only
    content_hidden: int = 128
    pooling: str = "mean"  # "mean" | "attention" (parameter-free, query = user vector)
    recency: float = 3.0  # pooling weight exp(recency * (pos - last) / length): newer counts more
    item_bias: bool = True
    init_std: float = 0.05
    # Widths of blocks of the pooled user vector that are each scaled to unit length (() = none); they
    # sum to dim. The spectral DP item tower's spectral and content blocks (fedtower.privacy.spectral).
    user_blocks: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.num_items < 1:
            raise ValueError(f"num_items must be at least 1, got {self.num_items}.")
        if self.num_users < 0:
            raise ValueError(f"num_users must be 0 or more, got {self.num_users}.")
        if self.dim < 1:
            raise ValueError(f"dim must be at least 1, got {self.dim}.")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}.")
        if not self.recency >= 0:  # also rejects NaN
            raise ValueError(f"recency must be non-negative, got {self.recency}.")
        self.user_blocks = tuple(int(b) for b in self.user_blocks)
        if self.user_blocks and (sum(self.user_blocks) != self.dim or min(self.user_blocks) < 1):
            raise ValueError(f"user_blocks {self.user_blocks} must be positive widths that sum to dim = {self.dim}.")

    def to_dict(self) -> dict:
        return asdict(self)


class ItemTower(nn.Module):
    """Item id embedding plus an MLP over public content features.

    The content MLP lets an item nobody has interacted with still get an
    embedding (item cold start). Content features are a non-persistent buffer:
    they are public catalogue data, not weights, so they never travel.
    """

    def __init__(self, config: TwoTowerConfig, content: torch.Tensor | None = None):
        super().__init__()
        self.config = config
        self.id_embedding = nn.Embedding(config.num_items, config.dim)
        nn.init.normal_(self.id_embedding.weight, std=config.init_std)
        self.bias = nn.Embedding(config.num_items, 1) if config.item_bias else None
        if self.bias is not None:
            nn.init.zeros_(self.bias.weight)
        self.content_mlp = None
        if config.content_dim > 0:
            self.content_mlp = nn.Sequential(
                nn.Linear(config.content_dim, config.content_hidden),
                nn.ReLU(),
                nn.Linear(config.content_hidden, config.dim),
            )
            if content is None:
                content = torch.zeros(config.num_items, config.content_dim)
            self.set_content(content)

    def set_content(self, content: torch.Tensor) -> None:
        expected = (self.config.num_items, self.config.content_dim)
        if tuple(content.shape) != expected:
            raise ValueError(
                f"Content features must have shape {expected}, got {tuple(content.shape)}."
            )
        self.register_buffer("content", content.float().contiguous(), persistent=False)

    def forward(self, item_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # item_ids: any shape S of rows -> vectors S x dim, bias S
        vectors = self.id_embedding(item_ids)
        if self.content_mlp is not None:
            vectors = vectors + self.content_mlp(self.content[item_ids])
        if self.bias is not None:
            bias = self.bias(item_ids).squeeze(-1)
        else:
            bias = torch.zeros(item_ids.shape, device=item_ids.device)
        return vectors, bias

    def content_vectors(self, content: torch.Tensor) -> torch.Tensor:
        """Embedding of items from content alone (new items not in the id table)."""
        if self.content_mlp is None:
            raise ValueError("This item tower has no content MLP (content_dim = 0).")
        return self.content_mlp(content.float())


class UserTower(nn.Module):
    """Private per-user free embedding plus pooled history (never leaves the client)."""

    def __init__(self, config: TwoTowerConfig):
        super().__init__()
        self.config = config
        self.embedding = None
        if config.num_users > 0:
            # Zero init: a user starts as their pooled history and only drifts
            # from it as far as their own data pulls.
            self.embedding = nn.Embedding(config.num_users, config.dim)
            nn.init.zeros_(self.embedding.weight)

    def forward(
        self,
        user_ids: torch.Tensor | None,
        history_vectors: torch.Tensor,
        history_mask: torch.Tensor,
        free: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # user_ids B (or None for users without a free embedding), history_vectors B x L x d,
        # history_mask B x L (1 = real item, oldest first, pads anywhere) -> B x d
        weights = recency_weights(history_mask, self.config.recency)
        pooled = (weights.unsqueeze(-1) * history_vectors).sum(1)
        if free is None:
            free = self.free_vectors(user_ids, history_vectors)
        if self.config.pooling == "attention":
            query = pooled + free
            logits = (history_vectors @ query.unsqueeze(-1)).squeeze(-1) / math.sqrt(
                query.shape[-1]
            )
            logits = logits.masked_fill(history_mask <= 0, float("-inf"))
            attention = torch.nan_to_num(torch.softmax(logits, dim=-1)) * (weights > 0)
            pooled = (attention.unsqueeze(-1) * history_vectors).sum(1)
        if self.config.user_blocks:
            pooled = unit_blocks(pooled, self.config.user_blocks)
        return pooled + free

    def free_vectors(self, user_ids: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        if self.embedding is None or user_ids is None:
            return like.new_zeros(like.shape[0], like.shape[-1])
        return self.embedding(user_ids)


def unit_blocks(vectors: torch.Tensor, widths: tuple[int, ...]) -> torch.Tensor:
    """B x d -> B x d with each block of columns scaled to unit L2 norm (an all-zero block stays zero)."""
    parts = vectors.split(list(widths), dim=-1)
    return torch.cat([F.normalize(part, dim=-1, eps=1e-12) for part in parts], dim=-1)


def recency_weights(mask: torch.Tensor, recency: float) -> torch.Tensor:
    """Normalised pooling weights B x L: newer items weigh more, pads weigh 0.

    Positions count real items only (oldest = 0), so left or right padding
    gives the same weights.
    """
    mask = mask.float()
    position = mask.cumsum(-1) - 1  # 0 for the oldest real item
    length = mask.sum(-1, keepdim=True).clamp(min=1)
    raw = torch.exp(recency * (position - (length - 1)) / length) * mask
    return raw / raw.sum(-1, keepdim=True).clamp(min=1e-12)


class TwoTower(nn.Module):
    """score(user, item) = <user vector, item vector> + item bias."""

    def __init__(self, config: TwoTowerConfig, content: torch.Tensor | None = None):
        super().__init__()
        self.config = config
        self.item_tower = ItemTower(config, content)
        self.user_tower = UserTower(config)

    def forward(
        self,
        user_ids: torch.Tensor,
        history: torch.Tensor,
        candidates: torch.Tensor,
        user_free: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-sample form (what Opacus sees): B users, B x L history, B x C candidates -> B x C.

        `user_free` (B x d) replaces the free-embedding lookup: user-level DP
        feeds each user's private vector in as an input, outside the DP step.
        """
        length = history.shape[1]
        mask = history != PAD
        ids = torch.cat(
            [history.clamp(min=0), candidates], dim=1
        )  # one embedding call: B x (L + C)
        vectors, bias = self.item_tower(ids)
        users = self.user_tower(user_ids, vectors[:, :length], mask, user_free)  # B x d
        return (vectors[:, length:] @ users.unsqueeze(-1)).squeeze(-1) + bias[:, length:]

    def item_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every catalogue item: vectors N x d and bias N."""
        rows = torch.arange(
            self.config.num_items, device=self.item_tower.id_embedding.weight.device
        )
        return self.item_tower(rows)

    def user_vectors(
        self, user_ids: torch.Tensor | None, history: torch.Tensor, item_vectors: torch.Tensor
    ) -> torch.Tensor:
        """User vectors B x d from a precomputed item table (training on the whole catalogue, serving)."""
        mask = history != PAD
        # B x L x d; F.embedding (not indexing) keeps the backward deterministic
        history_vectors = F.embedding(history.clamp(min=0), item_vectors)
        return self.user_tower(user_ids, history_vectors, mask)

    def score_all(self, user_ids: torch.Tensor | None, history: torch.Tensor) -> torch.Tensor:
        """Scores B x N over the whole catalogue."""
        vectors, bias = self.item_table()
        return self.user_vectors(user_ids, history, vectors) @ vectors.T + bias

    def load_item_tower(self, state: dict[str, torch.Tensor], *, source: str, hint: str) -> None:
        """Load an item tower from elsewhere (the server, a snapshot); any other key or shape is
        refused with a ValueError that names `source` and ends with `hint`."""
        expected = self.item_tower_state()
        if set(state) != set(expected):
            raise ValueError(f"{source} has arrays {sorted(set(state) ^ set(expected))} that do not match "
                             f"this model's item tower; {hint}")  # fmt: skip
        for key, tensor in state.items():
            if tuple(tensor.shape) != tuple(expected[key].shape):
                raise ValueError(f"{source}'s '{key}' has shape {tuple(tensor.shape)}, this model expects "
                                 f"{tuple(expected[key].shape)}; {hint}")  # fmt: skip
        self.load_state_dict(state, strict=False)

    def item_tower_state(self) -> dict[str, torch.Tensor]:
        """The only tensors that may leave a client."""
        return {k: v for k, v in self.state_dict().items() if k.startswith(ITEM_TOWER_PREFIX)}

    def user_state(self) -> dict[str, torch.Tensor]:
        """Private tensors: never sent anywhere."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(ITEM_TOWER_PREFIX)}


def pad_histories(histories: list, max_len: int) -> torch.Tensor:
    """Left-aligned, right-padded B x L id tensor of each user's last `max_len` items."""
    length = max(1, min(max_len, max((len(h) for h in histories), default=1)))
    out = torch.full((len(histories), length), PAD, dtype=torch.long)
    for row, items in enumerate(histories):
        recent = items[-length:] if len(items) else items
        if len(recent):
            out[row, : len(recent)] = torch.as_tensor(recent, dtype=torch.long)
    return out


def drop_history(
    history: torch.Tensor, rate: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Randomly hide history items (denoising training); keeps at least one real item per user."""
    if rate <= 0:
        return history
    real = history != PAD
    keep = (torch.rand(history.shape, generator=generator) >= rate) & real
    # A user whose every item was dropped keeps the newest one.
    empty = ~keep.any(1) & real.any(1)
    if empty.any():
        newest = real.long().cumsum(1).argmax(1)
        keep[empty, newest[empty]] = True
    return torch.where(keep, history, torch.full_like(history, PAD))


def softmax_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Multinomial likelihood over the catalogue: logits B x N, target weights B x N -> per-user B."""
    return -(F.log_softmax(logits, dim=-1) * targets).sum(-1)

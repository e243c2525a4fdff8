"""Activation-aware start: clustering, block scores and initial logits."""

import pytest
import torch

from tomoe_modifier.warm_start import (
    expert_block_scores,
    initial_block_logits,
    kmeans,
    router_weight,
)


@pytest.mark.unit
def test_kmeans_separates_clear_clusters_and_router_follows_them():
    torch.manual_seed(0)
    centers = torch.eye(4)[:2] * 10  # two directions
    x = torch.cat([centers[0] + torch.randn(50, 4), centers[1] + torch.randn(50, 4)])
    c = kmeans(x, 2, seed=0)
    weight = router_weight(c, x)
    choice = (x @ weight.T).argmax(-1)
    assert choice[:50].unique().numel() == 1 and choice[50:].unique().numel() == 1
    assert choice[0] != choice[-1]


@pytest.mark.unit
def test_each_expert_starts_with_its_own_best_blocks():
    x = torch.cat(
        [
            torch.tensor([[1.0, 0.0]]).repeat(5, 1),
            torch.tensor([[0.0, 1.0]]).repeat(5, 1),
        ]
    )
    energy = torch.zeros(10, 4)
    energy[:5, 0] = 1.0  # cluster A needs block 0
    energy[5:, 3] = 1.0  # cluster B needs block 3
    centroids = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    scores = expert_block_scores(energy, x, centroids)
    logits = initial_block_logits(scores, keep=1, on=3.0, off=-6.0)
    assert logits.tolist() == [[3.0, -6.0, -6.0, -6.0], [-6.0, -6.0, -6.0, 3.0]]

"""The one visibility rule (hf_sinks.visibility, docs/design.md §2.1) against hand-written cases.

Every Python backend and the spec build their masks from ``sink_visible``, so the rule itself is pinned down here
by enumeration, not by another copy of the formula.
"""

import pytest
import torch

from hf_sinks.attention.reference import visible_indices
from hf_sinks.visibility import sink_visible, visible_keys

# S = 2, W = 3, queries/keys 0..6: row i lists the keys query i sees (written out by hand)
HAND_S2_W3 = {
    0: [0],
    1: [0, 1],
    2: [0, 1, 2],
    3: [0, 1, 2, 3],
    4: [0, 1, 2, 3, 4],
    5: [0, 1, 3, 4, 5],
    6: [0, 1, 4, 5, 6],
}


def test_sink_visible_matches_a_hand_enumerated_case():
    i = torch.arange(7)
    mask = sink_visible(i[:, None], i[None, :], 2, 3)
    assert mask.shape == (7, 7) and mask.dtype == torch.bool
    for q, keys in HAND_S2_W3.items():
        assert mask[q].nonzero().flatten().tolist() == keys


def test_edge_cases_by_hand():
    # S = 0: plain window attention of W keys, the query included
    assert visible_keys(5, 0, 2).tolist() == [4, 5]
    # W = 1: the sinks and the query itself
    assert visible_keys(5, 3, 1).tolist() == [0, 1, 2, 5]
    # below capacity: causal
    assert visible_keys(3, 4, 4).tolist() == [0, 1, 2, 3]
    assert visible_indices(10, 2, 3) == [0, 1, 8, 9, 10]


def test_padding_is_never_visible():
    # -1 marks padding (or an empty cache slot): a padding key is never seen, a padding query sees nothing
    q = torch.tensor([-1, 0, 1, 4])
    k = torch.tensor([-1, 0, 1, 2, 3, 4])
    mask = sink_visible(q[:, None], k[None, :], 1, 2)
    expected = torch.tensor(
        [
            [0, 0, 0, 0, 0, 0],  # padding query
            [0, 1, 0, 0, 0, 0],
            [0, 1, 1, 0, 0, 0],
            [0, 1, 0, 0, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)


def test_broadcasts_over_batch_and_scalars():
    q_real = torch.tensor([[5], [-1]])  # [B, 1]
    k_real = torch.tensor([[0, 1, 4, 5], [0, 1, 4, 5]])  # [B, k]
    assert sink_visible(q_real, k_real, 1, 2).tolist() == [[True, False, True, True], [False] * 4]
    assert bool(sink_visible(6, 0, 1, 1)) and not bool(sink_visible(6, 1, 1, 1))


@pytest.mark.parametrize("i", [0, 1, 2, 5, 11, 12, 13, 40])
@pytest.mark.parametrize("s,w", [(0, 1), (2, 3), (2, 10), (4, 5), (3, 20)])
def test_visible_keys_is_the_rule_in_index_form(i, s, w):
    assert visible_keys(i, s, w).tolist() == [j for j in range(i + 1) if j < s or i - j < w]
    assert len(visible_keys(i, s, w)) == min(i + 1, s + w)

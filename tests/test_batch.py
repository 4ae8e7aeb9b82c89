"""Batching: target-space layout, extras alignment, packing exactness, split-invariant token counts."""

import pytest
import torch

from minigrpo.batch import Sample, collate_rows, empty_micro_batch, equalize_micro_batches, global_token_count, group_rows, make_micro_batches, pack_rows
from minigrpo.model import IGNORE_INDEX, LogprobModel, load_model

PAD = 0


def _samples() -> list[Sample]:
    return [
        Sample([5, 6], [7, 8, 9], {"adv": [1.0, 2.0, 3.0]}, {"reward": 0.5}),
        Sample([10, 11, 12], [13], {"adv": torch.tensor([4.0])}, {"reward": -1.0}),
        Sample([14], [15, 16], {"adv": [5.0, 6.0]}, {"reward": 2.0}),
    ]


def test_padded_layout_in_target_space():
    mb = collate_rows(_samples(), [[0], [1], [2]], PAD, packed=False)
    assert mb.input_ids.tolist() == [[5, 6, 7, 8, 9], [10, 11, 12, 13, 0], [14, 15, 16, 0, 0]]
    assert mb.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]
    # Column t scores token t + 1: completion [7, 8, 9] is scored at columns 1, 2, 3.
    X = IGNORE_INDEX
    assert mb.targets.tolist() == [[X, 7, 8, 9, X], [X, X, 13, X, X], [15, 16, X, X, X]]
    assert mb.token_fields["adv"].tolist() == [[0, 1, 2, 3, 0], [0, 0, 4, 0, 0], [5, 6, 0, 0, 0]]
    assert mb.token_fields["reward"].tolist() == [[0, 0.5, 0.5, 0.5, 0], [0, 0, -1, 0, 0], [2, 2, 0, 0, 0]]
    assert mb.seq_index.tolist() == [[-1, 0, 0, 0, -1], [-1, -1, 1, -1, -1], [2, 2, -1, -1, -1]]
    assert mb.num_tokens == 6 and mb.input_tokens == 12
    assert torch.equal(mb.loss_mask, (mb.targets != X).float())


def test_packed_layout_restarts_positions():
    mb = collate_rows(_samples(), [[0, 2], [1]], PAD, packed=True)
    assert mb.attention_mask is None
    assert mb.input_ids[0].tolist() == [5, 6, 7, 8, 9, 14, 15, 16]
    assert mb.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 0, 1, 2, 3]]  # pad tail: own segment
    X = IGNORE_INDEX
    # The last token of sequence 0 does not predict sequence 1's first (prompt) token.
    assert mb.targets[0].tolist() == [X, 7, 8, 9, X, 15, 16, X]
    assert mb.seq_index[0].tolist() == [-1, 0, 0, 0, -1, 2, 2, -1]


def test_bad_token_field_length_is_an_error():
    with pytest.raises(ValueError, match="token field 'adv' has 2 values for 3 completion tokens"):
        collate_rows([Sample([1], [2, 3, 4], {"adv": [1.0, 2.0]})], [[0]], PAD, packed=False)


def test_pack_rows_first_fit():
    assert pack_rows([5, 3, 4, 2, 6], 8) == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError, match="more than the packed row length"):
        pack_rows([9], 8)


def test_group_rows_by_count_and_token_budget():
    assert group_rows([5, 5, 5, 5, 5], 2) == [[0, 1], [2, 3], [4]]
    # Budget 12 padded tokens: [3, 4, 4] pads to 3 x 4 = 12; adding 9 would need 4 x 9.
    assert group_rows([3, 4, 4, 9, 2, 20], 8, max_tokens=12) == [[0, 1, 2], [3], [4], [5]]
    mbs = make_micro_batches(_samples(), 3, PAD, max_tokens=8)
    assert all(mb.input_ids.numel() <= 8 for mb in mbs) and sum(mb.num_tokens for mb in mbs) == 6


@pytest.mark.parametrize("micro_batch_size", [1, 2, 3])
def test_token_count_does_not_depend_on_the_split(micro_batch_size):
    samples = _samples()
    assert global_token_count(make_micro_batches(samples, micro_batch_size, PAD)) == 6
    assert global_token_count(make_micro_batches(samples, micro_batch_size, PAD, pack_len=8)) == 6


def test_empty_micro_batch_scores_nothing():
    mb = empty_micro_batch(PAD, ["adv"])
    assert mb.num_tokens == 0 and mb.input_tokens == 0 and mb.input_ids.shape == (1, 1)
    assert "adv" in mb.token_fields


def test_equalize_without_process_group_keeps_the_list():
    mbs = make_micro_batches(_samples(), 2, PAD)
    assert equalize_micro_batches(mbs, PAD) == mbs  # world size 1: nothing to pad


def test_packed_logprobs_equal_padded_logprobs(tiny_model_dir):
    """Packing is only offered because transformers isolates packed sequences: check it does."""
    torch.manual_seed(0)
    model = LogprobModel(load_model(tiny_model_dir)).eval()
    vocab = model.config.vocab_size
    samples = [Sample(torch.randint(3, vocab, (p,)).tolist(), torch.randint(3, vocab, (c,)).tolist()) for p, c in [(4, 6), (3, 2), (7, 5), (2, 9)]]
    padded = make_micro_batches(samples, 4, PAD)[0]
    packed = make_micro_batches(samples, 4, PAD, pack_len=20)[0]
    assert packed.input_ids.shape[0] < len(samples)  # it really packed
    with torch.no_grad():
        lp_pad, _ = model(padded.input_ids, padded.targets, padded.attention_mask, padded.position_ids)
        lp_pack, _ = model(packed.input_ids, packed.targets, packed.attention_mask, packed.position_ids)
        # Control: the same packed rows with a plain all-ones mask let sequences see each other.
        lp_leak, _ = model(packed.input_ids, packed.targets, torch.ones_like(packed.input_ids), None)
    per_seq = lambda mb, lp: torch.stack([lp[mb.seq_index == i].sum() for i in range(len(samples))])  # noqa: E731
    torch.testing.assert_close(per_seq(packed, lp_pack), per_seq(padded, lp_pad), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(per_seq(packed, lp_leak), per_seq(padded, lp_pad), atol=1e-3)


def test_dense_targets_give_fresh_outputs_in_place_of_the_scored_tokens(tiny_model_dir):
    """(B, T) targets: each scored token's log-prob and entropy land at its own position (those of the score_index
    path), zeros elsewhere, and the outputs are new tensors, not views (FSDP2 would warn about a view: an in-place
    op on one drops its pre-backward hook). Gradients flow through them."""
    torch.manual_seed(0)
    model = LogprobModel(load_model(tiny_model_dir))
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (3, 7))
    targets = torch.full_like(ids, IGNORE_INDEX)
    targets[0, 2:6], targets[2, 0], targets[2, 4:6] = ids[0, 3:7], ids[2, 1], ids[2, 5:7]
    logp, entropy = model(ids, targets, return_entropy=True)
    rows = (targets.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)
    sparse, sparse_entropy = model(ids, targets.reshape(-1)[rows], return_entropy=True, score_index=rows)
    for dense, want in ((logp, sparse), (entropy, sparse_entropy)):
        assert dense.shape == (3, 7) and not dense._is_view()
        torch.testing.assert_close(dense.reshape(-1)[rows], want, rtol=0, atol=0)
        assert (dense.reshape(-1)[(targets.reshape(-1) == IGNORE_INDEX)] == 0).all()
    logp.sum().backward()
    assert model.lm.get_output_embeddings().weight.grad.abs().sum() > 0

"""D2NWG's pieces checked against references: heads as tokens and back, what each dataset encoder does when the
support labels are permuted, the denoiser's equivariance, and both alignment losses against hand computations."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.d2nwg import DIM, TINY, tiny_d2nwg
from helpers.mcdi import support_set

from ocd_hf.methods.d2nwg import HeadVectorizer, LatentDenoiser, group_by_class, info_nce_loss, soft_target_loss


def test_heads_become_tokens_and_back_exactly():
    heads = torch.randn(2, 3, 4, DIM + 1)  # 4-way heads, up to 5 classes
    weights, bias = heads[..., :-1], heads[..., -1]
    model = HeadVectorizer("model", DIM, 5).to_tokens(heads)
    expected = torch.cat([weights.flatten(-2), torch.zeros(2, 3, DIM), bias, torch.zeros(2, 3, 1)], -1)  # W row-major, then b, padded
    assert torch.equal(model, expected.unsqueeze(-2))
    layer = HeadVectorizer("layer", DIM, 5, chunk_size=6)
    tokens = layer.to_tokens(heads)
    assert tokens.shape == (2, 3, math.ceil(5 * DIM / 6) + 1, 6) and layer.num_positions == tokens.shape[-2]
    assert torch.equal(tokens[..., 0, :], weights.flatten(-2)[..., :6]) and torch.equal(tokens[..., -1, :4], bias)
    for vectorizer in (HeadVectorizer("row", DIM, 5), HeadVectorizer("model", DIM, 5), layer):
        assert torch.equal(vectorizer.to_heads(vectorizer.to_tokens(heads), 4), heads), vectorizer.mode
    with pytest.raises(ValueError, match="needs chunk_size"):
        HeadVectorizer("layer", DIM, 5)


@pytest.mark.parametrize("encoder_type", ["set_transformer", "row_aligned", "mlp"])
def test_what_each_dataset_encoder_does_when_the_labels_are_permuted(encoder_type):
    model = tiny_d2nwg(encoder_type=encoder_type, vectorization="row" if encoder_type == "row_aligned" else "model").double()
    support, labels = support_set(num_tasks=2, n_way=4, k_shot=3)
    support = support.double()
    relabel = torch.tensor([2, 0, 3, 1])  # the class labelled j is now labelled relabel[j]
    code = model.encode_support(group_by_class(support, labels, 4))
    permuted = model.encode_support(group_by_class(support, relabel[labels], 4))
    if encoder_type == "set_transformer":
        # The paper's encoder gives the same code: it cannot know which head row is which class.
        torch.testing.assert_close(permuted, code, rtol=1e-12, atol=1e-12)
    elif encoder_type == "row_aligned":
        # Equivariant: the token of the class now labelled relabel[j] is the old token j.
        assert code.shape == (2, 4, TINY["encoder_config"]["code_size"])
        torch.testing.assert_close(permuted[:, relabel], code, rtol=1e-12, atol=1e-12)
    else:
        assert (permuted - code).abs().max() > 1e-3  # order-aware: the code depends on which class has which label
    # Items within a class are a set for both Set Transformer encoders.
    shuffled = group_by_class(support, labels, 4)[:, :, torch.tensor([2, 0, 1])]
    if encoder_type != "mlp":
        torch.testing.assert_close(model.encode_support(shuffled), code, rtol=1e-12, atol=1e-12)


def test_generated_rows_follow_the_labels_only_with_the_row_aligned_encoder():
    support, labels = support_set(num_tasks=1, n_way=4, k_shot=2)
    support, relabel = support.double(), torch.tensor([2, 0, 3, 1])
    aligned = tiny_d2nwg(encoder_type="row_aligned").double()
    noise = torch.randn(1, 2, 4, TINY["vae_config"]["latent_size"], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    row_noise = torch.empty_like(noise)
    row_noise[:, :, relabel] = noise  # each class keeps its starting noise
    heads = aligned.generate_heads(support, labels, num_samples=2, noise=noise)
    torch.testing.assert_close(aligned.generate_heads(support, relabel[labels], num_samples=2, noise=row_noise)[:, :, relabel], heads,
                               rtol=1e-10, atol=1e-10)
    pooled = tiny_d2nwg(encoder_type="set_transformer", vectorization="model").double()
    noise = torch.randn(1, 2, 1, TINY["vae_config"]["latent_size"], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    # With the label-invariant code the relabelled task gets the very same head: row j no longer scores its class.
    torch.testing.assert_close(pooled.generate_heads(support, relabel[labels], 2, noise=noise), pooled.generate_heads(support, labels, 2, noise=noise),
                               rtol=1e-12, atol=1e-12)


def test_the_denoiser_without_positions_is_equivariant_in_the_tokens():
    torch.manual_seed(0)
    denoiser = LatentDenoiser(5, 7, **TINY["denoiser_config"]).double()
    for parameter in denoiser.parameters():
        torch.nn.init.normal_(parameter, std=0.3)
    latents, code, steps = torch.randn(3, 4, 5, dtype=torch.float64), torch.randn(3, 4, 7, dtype=torch.float64), torch.tensor([0, 500, 1023])
    order = torch.tensor([3, 1, 0, 2])
    torch.testing.assert_close(denoiser(latents[:, order], steps, code[:, order]), denoiser(latents, steps, code)[:, order], rtol=1e-10, atol=1e-10)
    positional = LatentDenoiser(5, 7, num_positions=4, **TINY["denoiser_config"]).double()
    for parameter in positional.parameters():
        torch.nn.init.normal_(parameter, std=0.3)
    assert (positional(latents[:, order], steps, code[:, order]) - positional(latents, steps, code)[:, order]).abs().max() > 1e-3


def test_info_nce_matches_a_hand_computation():
    generator = torch.Generator().manual_seed(0)
    codes, latents = torch.randn(4, 3, generator=generator, dtype=torch.float64), torch.randn(4, 3, generator=generator, dtype=torch.float64)
    scale = torch.tensor(math.log(5.0), dtype=torch.float64)
    c = [[x / math.sqrt(sum(v * v for v in row)) for x in row] for row in codes.tolist()]
    z = [[x / math.sqrt(sum(v * v for v in row)) for x in row] for row in latents.tolist()]
    sim = [[5.0 * sum(a * b for a, b in zip(c[i], z[j])) for j in range(4)] for i in range(4)]
    expected = []
    for i in range(4):
        to_latents = -sim[i][i] + math.log(sum(math.exp(sim[i][j]) for j in range(4)))
        to_codes = -sim[i][i] + math.log(sum(math.exp(sim[j][i]) for j in range(4)))
        expected.append((to_latents + to_codes) / 2)
    torch.testing.assert_close(info_nce_loss(codes, latents, scale), torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    # Scaling either side does not change it (normalised features); a learned scale above 100 is capped.
    torch.testing.assert_close(info_nce_loss(3 * codes, latents, scale), info_nce_loss(codes, latents, scale))
    torch.testing.assert_close(info_nce_loss(codes, latents, torch.tensor(9.0)), info_nce_loss(codes, latents, torch.tensor(math.log(100.0))))


def test_the_soft_target_loss_matches_a_hand_computation():
    generator = torch.Generator().manual_seed(1)
    codes, latents = torch.randn(3, 2, generator=generator, dtype=torch.float64), torch.randn(3, 2, generator=generator, dtype=torch.float64)
    C, Z = codes.tolist(), latents.tolist()

    def dot(a, b):
        return sum(x * y for x, y in zip(a, b))

    logits = [[dot(C[i], Z[j]) for j in range(3)] for i in range(3)]  # τ = 1, no normalisation
    similarity = [[(dot(C[i], C[j]) + dot(Z[i], Z[j])) / 2 for j in range(3)] for i in range(3)]
    targets = [[math.exp(s) / sum(math.exp(t) for t in row) for s in row] for row in similarity]
    expected = []
    for i in range(3):
        row_norm = math.log(sum(math.exp(v) for v in logits[i]))
        column_norm = math.log(sum(math.exp(logits[j][i]) for j in range(3)))
        codes_loss = -sum(targets[i][j] * (logits[i][j] - row_norm) for j in range(3))
        latents_loss = -sum(targets[j][i] * (logits[j][i] - column_norm) for j in range(3))
        expected.append((codes_loss + latents_loss) / 2)
    torch.testing.assert_close(soft_target_loss(codes, latents), torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_grouping_needs_the_same_shots_per_class():
    support, labels = torch.randn(1, 5, DIM), torch.tensor([[0, 1, 0, 1, 1]])
    with pytest.raises(ValueError, match=r"same number K of support items, got \[\[2, 3\]\]"):
        group_by_class(support, labels, 2)
    grouped = group_by_class(support[:, :4], torch.tensor([[1, 0, 0, 1]]), 2)  # class 0: items 1, 2; class 1: items 0, 3
    assert torch.equal(grouped[0], support[0, torch.tensor([[1, 2], [0, 3]])])

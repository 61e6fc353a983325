"""Factorised (rank-1) deltas: detection on real overfit deltas, exact application without
materialising matrices, and the head fast path."""

from __future__ import annotations

import pytest
import torch
from conftest import text_batch, tiny_bert, tiny_mlp

from ocd_hf import OCDConfig, OCDWrapper
from ocd_hf.factorised import expand_factors, factorise_deltas
from ocd_hf.finetune import overfit_deltas

FACTOR_DENOISER = {"hidden_dim": 16, "num_layers": 1, "embed_dim": 8}


@pytest.mark.parametrize("optimizer, rule", [("adam", "sign"), ("sgd", "input")])
def test_head_deltas_are_rank_one_with_the_rule_of_their_optimizer(optimizer, rule):
    backbone, inputs = tiny_bert(), text_batch(batch=6)
    cond_input = OCDWrapper.attach(backbone, "classifier", factor_denoiser_config=FACTOR_DENOISER, delta_mode="factorised").conditioning(**inputs).raw_input
    result = overfit_deltas(backbone, backbone.classifier, inputs, torch.tensor([0, 1, 2, 0, 1, 2]), optimizer=optimizer, lr=1e-2)
    factors, residual = factorise_deltas(result.deltas, cond_input, rule)
    assert residual.max() < 1e-3
    torch.testing.assert_close(expand_factors(factors, cond_input, rule), result.deltas, atol=1e-6, rtol=1e-4)
    wrong_rule = "input" if rule == "sign" else "sign"
    assert factorise_deltas(result.deltas, cond_input, wrong_rule)[1].max() > 1e-2


@pytest.mark.parametrize("shape", [(40, 84, 120), (9, 2, 384), (3, 1, 1)])
def test_residuals_in_cache_sized_chunks_equal_one_pass_over_the_batch(shape, monkeypatch):
    from ocd_hf import factorised

    generator = torch.Generator().manual_seed(0)
    deltas = torch.randn(*shape, generator=generator) * 1e-3
    layer_input = torch.randn(shape[0], shape[2], generator=generator)
    deltas[1] = 0  # an all-zero delta: residual 0
    monkeypatch.setattr(factorised, "RESIDUAL_CHUNK_ELEMENTS", 3 * shape[1] * shape[2])  # several chunks, the last short
    for rule in ("sign", "input"):
        # Reference: the whole batch in one pass.
        v = factorised.right_factor(layer_input, rule)
        u = torch.einsum("boi,bi->bo", deltas, v) / v.pow(2).sum(-1, keepdim=True).clamp_min(1e-30)
        residual = (deltas - u.unsqueeze(-1) * v.unsqueeze(1)).flatten(1).norm(dim=1) / deltas.flatten(1).norm(dim=1).clamp_min(1e-30)
        factors, chunked = factorise_deltas(deltas, layer_input, rule)
        assert torch.equal(factors, u) and torch.equal(chunked, residual)


def test_per_token_deltas_are_not_rank_one():
    backbone, inputs = tiny_bert(), text_batch(batch=3)
    layer = backbone.bert.encoder.layer[0].intermediate.dense
    result = overfit_deltas(backbone, layer, inputs, torch.tensor([0, 1, 2]))
    pooled = OCDWrapper.attach(backbone, "intermediate.dense").conditioning(**inputs).layer_input
    assert factorise_deltas(result.deltas, pooled, "sign")[1].min() > 1e-2


def test_factorised_mode_is_refused_on_per_token_layers():
    with pytest.raises(ValueError, match="not rank-1"):
        OCDConfig.from_backbone(tiny_bert(), "intermediate.dense", delta_mode="factorised")


@pytest.mark.parametrize("backbone_factory, target, inputs", [
    (tiny_bert, "classifier", text_batch()),
    (tiny_mlp, "fc1", {"features": torch.randn(4, 6)}),
])
def test_factorised_application_equals_the_materialised_delta(backbone_factory, target, inputs):
    backbone = backbone_factory()
    ocd = OCDWrapper.attach(backbone, target, example_inputs=inputs, factor_denoiser_config=FACTOR_DENOISER, delta_mode="factorised")
    cond = ocd.conditioning(**inputs)
    factors = torch.randn(4, 2, ocd.config.out_features, generator=torch.Generator().manual_seed(0))
    full = ocd.full_deltas(factors, cond)
    assert full.shape == (4, 2, *ocd.config.weight_shape)
    with pytest.warns(FutureWarning, match="renamed full_deltas"):
        assert torch.equal(ocd.materialise_deltas(factors, cond), full)  # the former name still works
    via_factors = ocd.forward_with_deltas(factors[:, 0], **inputs).logits
    via_matrices = ocd.forward_with_deltas(full[:, 0], **inputs).logits
    torch.testing.assert_close(via_factors, via_matrices, atol=1e-5, rtol=1e-5)
    out = ocd(**inputs, num_samples=3, return_draws=True, generator=torch.Generator().manual_seed(1))
    assert out.draw_logits.shape[:2] == (4, 3) and torch.isfinite(out.logits).all()
    assert ocd.generate_deltas(cond, 3).shape == (4, 3, ocd.config.out_features)


def test_head_fast_path_equals_a_second_backbone_pass():
    backbone, inputs = tiny_bert(), text_batch()
    ocd = OCDWrapper.attach(backbone, "classifier", factor_denoiser_config=FACTOR_DENOISER, delta_mode="factorised")
    cond = ocd.conditioning(**inputs)
    assert cond.target_is_output
    deltas = torch.randn(4, 3, 3, 16, generator=torch.Generator().manual_seed(0))
    fast = ocd.predict_with_deltas(cond, deltas, inputs)
    repeated = {k: v.repeat_interleave(3, 0) for k, v in inputs.items()}
    slow = ocd.forward_with_deltas(deltas.flatten(0, 1), **repeated).logits.view(4, 3, -1)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    assert not OCDWrapper.attach(backbone, "intermediate.dense").conditioning(**inputs).target_is_output

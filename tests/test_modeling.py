"""Core: OCDConfig / OCDWrapper on tiny backbones — batched per-sample weights, ensembles,
determinism, save/load, and the documented errors."""

from __future__ import annotations

import copy
import json
import logging
import os

import pytest
import torch
from conftest import TINY_DENOISER, image_batch, text_batch, tiny_bert, tiny_deit, tiny_mlp
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel

from ocd_hf import OCDConfig, OCDWrapper, find_target_linear
from ocd_hf.target import pool_tokens


def attach(backbone, target, inputs, **kwargs):
    return OCDWrapper.attach(backbone, target, example_inputs=inputs, denoiser_config=TINY_DENOISER, **kwargs)


def logits_of(output):
    return output.logits if hasattr(output, "logits") else output[0]


def test_from_backbone_infers_shapes():
    backbone = tiny_bert(num_labels=3)
    config = OCDConfig.from_backbone(backbone, "classifier")
    assert (config.out_features, config.in_features) == (3, 16)
    assert config.output_dim == 3 and config.task == "classification" and not config.per_token
    assert config.target_module == "classifier" and config.base_model_class == "BertForSequenceClassification"
    per_token = OCDConfig.from_backbone(backbone, "intermediate.dense")
    assert per_token.target_module == "bert.encoder.layer.0.intermediate.dense"
    assert per_token.per_token and per_token.weight_shape == (32, 16)
    regression = OCDConfig.from_backbone(tiny_mlp(), "head", example_inputs={"features": torch.zeros(2, 6)})
    assert regression.task == "regression" and regression.output_dim == 1


def test_config_round_trip_and_auto_registration(tmp_path):
    config = OCDConfig.from_backbone(tiny_bert(), "classifier", denoiser_config=TINY_DENOISER)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, OCDConfig)
    drop = lambda d: {k: v for k, v in d.items() if k != "_name_or_path"}  # noqa: E731
    assert drop(loaded.to_dict()) == drop(config.to_dict())
    assert loaded.scheduler_config["clip_sample"] is False
    assert loaded.scheduler_config["beta_start"] == 1e-6 and loaded.scheduler_config["beta_end"] == 1e-2
    assert loaded.sample_size == (4, 16)  # 3 x 16 padded to a multiple of 2 for a 2-level UNet


def test_batched_per_sample_deltas_equal_a_model_copy_per_sample(backbone_case):
    backbone, target, inputs = backbone_case
    ocd = attach(backbone, target, inputs)
    batch = next(iter(inputs.values())).shape[0]
    deltas = torch.randn(batch, *ocd.config.weight_shape, generator=torch.Generator().manual_seed(3)) * 0.1
    batched = logits_of(ocd.forward_with_deltas(deltas, **inputs))
    for b in range(batch):
        reference = copy.deepcopy(backbone)
        _, layer = find_target_linear(reference, ocd.target_name)
        with torch.no_grad():
            layer.weight += deltas[b]
        single = logits_of(reference(**{k: v[b : b + 1] for k, v in inputs.items()}))
        torch.testing.assert_close(batched[b : b + 1], single, atol=1e-5, rtol=1e-5)
    base = logits_of(backbone(**inputs))
    assert not torch.allclose(batched, base, atol=1e-4), "deltas had no effect"
    # the hook is removed after the call: the backbone is untouched
    torch.testing.assert_close(logits_of(backbone(**inputs)), base)


def test_forward_shapes_and_ensembling():
    backbone, inputs = tiny_bert(), text_batch()
    ocd = attach(backbone, "classifier", inputs)
    out = ocd(**inputs, num_samples=3, return_draws=True, return_mean_network=True, generator=torch.Generator().manual_seed(0))
    assert type(out).__name__ == "SequenceClassifierOutput"
    assert out.logits.shape == (4, 3) and out.draw_logits.shape == (4, 3, 3) and out.mean_network_logits.shape == (4, 3)
    expected = torch.softmax(out.draw_logits, -1).mean(1)
    torch.testing.assert_close(torch.softmax(out.logits, -1), expected)
    torch.testing.assert_close(out.logits.exp().sum(-1), torch.ones(4))
    labels = torch.tensor([0, 1, 2, 0])
    with_loss = ocd(**inputs, labels=labels, num_samples=3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(with_loss.loss, torch.nn.functional.nll_loss(with_loss.logits, labels))


def test_regression_ensemble_is_the_mean_prediction():
    backbone, inputs = tiny_mlp(), {"features": torch.randn(5, 6)}
    ocd = attach(backbone, "fc1", inputs)
    out = ocd(**inputs, num_samples=4, return_draws=True, generator=torch.Generator().manual_seed(0))
    assert ocd.config.task == "regression"
    assert out.draw_logits.shape == (5, 4, 1)
    torch.testing.assert_close(out.logits, out.draw_logits.mean(1))


def test_mean_network_applies_the_mean_delta():
    backbone, inputs = tiny_deit(), image_batch()
    ocd = attach(backbone, "classifier", inputs)
    cond = ocd.conditioning(**inputs)
    deltas = ocd.generate_deltas(cond, num_samples=2, generator=torch.Generator().manual_seed(5))
    out = ocd(**inputs, num_samples=2, return_mean_network=True, generator=torch.Generator().manual_seed(5))
    expected = ocd.forward_with_deltas(deltas.mean(1), **inputs).logits
    torch.testing.assert_close(out.mean_network_logits, expected)


def test_generated_deltas_are_scaled_unit_rms_samples():
    backbone, inputs = tiny_bert(), text_batch()
    ocd = attach(backbone, "classifier", inputs)
    cond = ocd.conditioning(**inputs)
    deltas = ocd.generate_deltas(cond, num_samples=2, generator=torch.Generator().manual_seed(0), rho=0.25)
    assert deltas.shape == (4, 2, 3, 16)
    rms = deltas.pow(2).mean((-1, -2)).sqrt()
    torch.testing.assert_close(rms, torch.full_like(rms, 0.25))


def test_determinism_under_a_fixed_generator():
    backbone, inputs = tiny_bert(), text_batch()
    ocd = attach(backbone, "classifier", inputs)
    first = ocd(**inputs, num_samples=2, generator=torch.Generator().manual_seed(7)).logits
    second = ocd(**inputs, num_samples=2, generator=torch.Generator().manual_seed(7)).logits
    other = ocd(**inputs, num_samples=2, generator=torch.Generator().manual_seed(8)).logits
    torch.testing.assert_close(first, second, atol=0, rtol=0)
    assert not torch.equal(first, other)


def test_sampling_runs_in_eval_mode_and_restores_training_mode():
    backbone, inputs = tiny_bert(), text_batch()
    ocd = attach(backbone, "classifier", inputs)
    ocd.hypernetwork.train()
    seen = []
    handle = ocd.hypernetwork.denoiser.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    ocd(**inputs)
    handle.remove()
    assert seen and not any(seen)
    assert ocd.hypernetwork.training


def test_pool_tokens_honours_the_attention_mask():
    values = torch.arange(12.0).view(1, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0]])
    torch.testing.assert_close(pool_tokens(values, mask), values[:, :2].mean(1))
    torch.testing.assert_close(pool_tokens(values, None), values.mean(1))


def test_save_load_round_trip_saves_only_the_hypernetwork(tmp_path):
    backbone, inputs = tiny_bert(), text_batch()
    ocd = attach(backbone, "intermediate.dense", inputs)
    ocd.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["README.md", "config.json", "model.safetensors"]
    saved = load_file(tmp_path / "model.safetensors")
    assert set(saved) == set(ocd.hypernetwork.state_dict())
    assert not any(key.startswith(("bert", "backbone", "classifier")) for key in saved)
    saved_bytes = sum(t.numel() * t.element_size() for t in saved.values())
    assert os.path.getsize(tmp_path / "model.safetensors") < saved_bytes + 64 * 1024
    loaded = OCDWrapper.from_pretrained(tmp_path, backbone=backbone)
    for name, tensor in ocd.hypernetwork.state_dict().items():
        assert torch.equal(tensor, loaded.hypernetwork.state_dict()[name]), name
    a = ocd(**inputs, num_samples=2, generator=torch.Generator().manual_seed(1)).logits
    b = loaded(**inputs, num_samples=2, generator=torch.Generator().manual_seed(1)).logits
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "ocd"


def test_from_pretrained_loads_the_backbone_named_in_the_config(tmp_path):
    backbone, inputs = tiny_bert(), text_batch()
    backbone.save_pretrained(tmp_path / "backbone")
    ocd = attach(backbone, "classifier", inputs, base_model_name_or_path=str(tmp_path / "backbone"))
    ocd.save_pretrained(tmp_path / "ocd")
    loaded = OCDWrapper.from_pretrained(tmp_path / "ocd")
    assert type(loaded.backbone).__name__ == "BertForSequenceClassification"
    generator = lambda: torch.Generator().manual_seed(2)  # noqa: E731
    torch.testing.assert_close(ocd(**inputs, generator=generator()).logits, loaded(**inputs, generator=generator()).logits)
    via_auto = AutoModel.from_pretrained(tmp_path / "ocd", backbone=backbone)
    assert isinstance(via_auto, OCDWrapper)


@pytest.mark.parametrize(
    "target, message",
    [
        ("does.not.exist", "matches no module"),
        ("dense", "is ambiguous"),
        ("bert.embeddings.LayerNorm", "not an nn.Linear"),
    ],
)
def test_bad_target_lists_candidate_linears(target, message):
    with pytest.raises(ValueError, match=message) as error:
        OCDWrapper.attach(tiny_bert(), target)
    assert "Candidate nn.Linear layers" in str(error.value)
    assert "classifier: Linear(16 -> 3)" in str(error.value)


def test_regex_target():
    name, layer = find_target_linear(tiny_bert(), r"bert\.encoder\.layer\.\d+\.output\.dense")
    assert name == "bert.encoder.layer.0.output.dense" and layer.in_features == 32


def test_loading_onto_a_backbone_with_another_shape_is_refused(tmp_path):
    attach(tiny_bert(num_labels=3), "classifier", text_batch()).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="weight shape"):
        OCDWrapper.from_pretrained(tmp_path, backbone=tiny_bert(num_labels=2))


def test_loading_onto_other_weights_is_refused_unless_allowed(tmp_path, library_logs):
    attach(tiny_bert(seed=0), "classifier", text_batch()).save_pretrained(tmp_path)
    other = tiny_bert(seed=1)
    with pytest.raises(ValueError, match="fingerprint"):
        OCDWrapper.from_pretrained(tmp_path, backbone=other)
    with library_logs.at_level(logging.WARNING, logger="ocd_hf"):
        OCDWrapper.from_pretrained(tmp_path, backbone=other, strict_fingerprint=False)
    assert "fingerprint" in library_logs.text


def test_corrupt_or_mismatched_weights_are_refused(tmp_path):
    backbone = tiny_bert()
    attach(backbone, "classifier", text_batch()).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        OCDWrapper.from_pretrained(tmp_path, backbone=backbone)
    attach(backbone, "classifier", text_batch()).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["condition_hidden_dim"] = 8
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="do not match the config"):
        OCDWrapper.from_pretrained(tmp_path, backbone=backbone)


def test_missing_files_and_missing_backbone_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        OCDWrapper.from_pretrained(tmp_path, backbone=tiny_bert())
    config = OCDConfig.from_backbone(tiny_bert(), "classifier")
    with pytest.raises(ValueError, match="needs its backbone"):
        OCDWrapper(config)
    config.save_pretrained(tmp_path)
    attach(tiny_bert(), "classifier", text_batch()).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="base_model_name_or_path"):
        OCDWrapper.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"task": "ranking"}, "task must be one of"),
        ({"delta_normalization": "max"}, "delta_normalization"),
        ({"condition_components": ["input", "labels"]}, "condition_components"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
    ],
)
def test_invalid_config_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        OCDConfig(**kwargs)


def test_invalid_forward_arguments():
    backbone, inputs = tiny_bert(), text_batch()
    ocd = attach(backbone, "classifier", inputs)
    with pytest.raises(ValueError, match="num_samples"):
        ocd(**inputs, num_samples=0)
    with pytest.raises(ValueError, match="No tensor input"):
        ocd()
    with pytest.raises(ValueError, match="deltas must have shape"):
        ocd.forward_with_deltas(torch.zeros(4, 16, 3), **inputs)

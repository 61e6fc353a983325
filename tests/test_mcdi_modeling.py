"""The Mc-Di head generator: label equivariance, batched generation equal to per-task calls, exact save/load,
the encoder check, heads as nn.Linear / SetFitHead, and the errors that name the fix."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.mcdi import DIM, TINY, support_set, tiny_generator
from huggingface_hub import HfApi
from torch import nn

from ocd_hf.methods.mcdi import (
    HeadDenoiser,
    McDiConfig,
    McDiHeadGenerator,
    McDiTrainingArguments,
    encoder_fingerprint,
    head_to_linear,
    head_to_setfit_head,
    head_to_setfit_model,
)


def test_the_denoiser_is_equivariant_in_the_rows():
    torch.manual_seed(0)
    denoiser = HeadDenoiser(DIM, **TINY)
    for parameter in denoiser.parameters():
        nn.init.normal_(parameter, std=0.3)
    denoiser.double()
    heads, prototypes = torch.randn(3, 5, DIM + 1, dtype=torch.float64), torch.randn(3, 5, DIM, dtype=torch.float64)
    steps, order = torch.tensor([1, 7, 21]), torch.tensor([3, 0, 4, 1, 2])
    torch.testing.assert_close(denoiser(heads[:, order], steps, prototypes[:, order]), denoiser(heads, steps, prototypes)[:, order],
                               rtol=1e-12, atol=1e-12)


def test_permuting_the_support_labels_permutes_the_generated_rows():
    model = tiny_generator().double()
    support, labels = support_set(num_tasks=2)
    support = support.double()
    noise = torch.randn(2, 3, 4, DIM + 1, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    relabel = torch.tensor([2, 0, 3, 1])  # class with label j gets label relabel[j]
    heads = model.generate_heads(support, labels, num_samples=3, noise=noise)
    row_noise = torch.empty_like(noise)
    row_noise[..., relabel, :] = noise  # each class keeps its starting noise
    relabelled = model.generate_heads(support, relabel[labels], num_samples=3, noise=row_noise)
    torch.testing.assert_close(relabelled[..., relabel, :], heads, rtol=1e-12, atol=1e-12)


def test_generation_is_batched_over_tasks_and_draws_and_seeded():
    model = tiny_generator()
    support, labels = support_set(num_tasks=3, k_shot=3)
    heads, states = model.generate_heads(support, labels, num_samples=2, generator=torch.Generator().manual_seed(0), return_intermediates=True)
    assert heads.shape == (3, 2, 4, DIM + 1) and states.shape == (3, 2, 3, 4, DIM + 1)
    assert torch.equal(states[:, :, -1], heads)  # the last boundary is s = 0: the head itself
    again = model.generate_heads(support, labels, num_samples=2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, heads)
    assert not torch.equal(heads[:, 0], heads[:, 1])  # every draw has its own noise
    model, support = model.double(), support.double()
    noise = torch.randn(3, 2, 4, DIM + 1, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    batched = model.generate_heads(support, labels, num_samples=2, noise=noise)
    for task in range(3):
        alone = model.generate_heads(support[task], labels[task], num_samples=2, noise=noise[task])
        assert alone.shape == (2, 4, DIM + 1)
        torch.testing.assert_close(alone, batched[task], rtol=1e-12, atol=1e-12)


def test_few_step_generation_with_every_state_is_the_full_chain_and_checks_its_steps():
    model = tiny_generator().double()
    support, labels = support_set(num_tasks=2, k_shot=2)
    noise = torch.randn(2, 1, 4, DIM + 1, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    full, full_states = model.generate_heads(support.double(), labels, noise=noise, return_intermediates=True)
    strided, strided_states = model.generate_heads(
        support.double(), labels, noise=noise, return_intermediates=True, num_inference_steps=model.config.num_timesteps
    )
    torch.testing.assert_close(strided, full, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(strided_states, full_states, rtol=1e-9, atol=1e-9)
    few = model.generate_heads(support.double(), labels, noise=noise, num_inference_steps=3)
    assert few.shape == full.shape and not torch.allclose(few, full)
    with pytest.raises(ValueError, match="num_inference_steps=4 must give every one of the 3 segments"):
        model.generate_heads(support, labels, num_inference_steps=4)
    with pytest.raises(TypeError, match="num_inference_steps must be an integer"):
        model.generate_heads(support, labels, num_inference_steps=3.0)


def test_save_load_round_trip_is_exact(tmp_path):
    model = tiny_generator(loss_type="twdi", harvest_config={"lr": 0.005, "n_way": 4})
    model.save_pretrained(tmp_path, model_card_kwargs={"training_config": {"num_steps": 3}})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    loaded = McDiHeadGenerator.from_pretrained(tmp_path)
    assert loaded.config.to_dict() == model.config.to_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    support, labels = support_set()
    generator = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    assert torch.equal(loaded.generate_heads(support[0], labels[0], 2, generator()), model.generate_heads(support[0], labels[0], 2, generator()))
    card = (tmp_path / "README.md").read_text()
    for text in ("tiny-encoder", "Tw-Di", "library_name: ocd-hf", "`num_steps` | 3", "0123abcd", "14, 7, 0"):
        assert text in card, text
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "mcdi"


def test_push_to_hub_and_save_pretrained_push_go_through_the_shared_hook(loopback_hub, tmp_path):
    model = tiny_generator()
    model.push_to_hub("mcdi-tiny")
    repo = f"{loopback_hub.user}/mcdi-tiny"
    assert sorted(HfApi().list_repo_files(repo)) == ["README.md", "config.json", "model.safetensors"]
    loaded = McDiHeadGenerator.from_pretrained(repo)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    model.save_pretrained(tmp_path / "mcdi-local", push_to_hub=True)  # pushed to a repo named after the directory
    assert "model.safetensors" in HfApi().list_repo_files(f"{loopback_hub.user}/mcdi-local")
    model.save_pretrained(tmp_path / "nested" / "generator")
    from_subfolder = McDiHeadGenerator.from_pretrained(tmp_path / "nested", subfolder="generator")
    for name, tensor in model.state_dict().items():
        assert torch.equal(from_subfolder.state_dict()[name], tensor), name


def test_the_encoder_check_refuses_another_encoder(tmp_path):
    encoder = nn.Linear(3, DIM)
    model = tiny_generator()
    model.config.encoder_fingerprint = encoder_fingerprint(encoder)
    model.check_encoder(encoder)
    model.check_encoder(fingerprint=encoder_fingerprint(encoder), embedding_dim=DIM)
    model.save_pretrained(tmp_path)
    McDiHeadGenerator.from_pretrained(tmp_path, encoder=encoder)
    other = nn.Linear(3, DIM)
    other.load_state_dict(encoder.state_dict())
    with torch.no_grad():
        other.weight[0, 0] += 1e-3  # one weight changed: another encoder
    with pytest.raises(ValueError, match="fingerprint .* differ.*'tiny-encoder'.*or train a generator"):
        McDiHeadGenerator.from_pretrained(tmp_path, encoder=other)
    with pytest.raises(ValueError, match=f"makes 16-d embeddings but .* {DIM}-d embeddings of 'tiny-encoder'"):
        model.check_encoder(embedding_dim=16)

    class SentenceEncoder(nn.Linear):
        def get_sentence_embedding_dimension(self) -> int:
            return self.out_features

    with pytest.raises(ValueError, match="makes 5-d embeddings"):
        model.check_encoder(SentenceEncoder(3, 5))


def test_heads_become_linear_layers_and_setfit_heads():
    head = torch.randn(4, DIM + 1)
    items = torch.randn(6, DIM)
    expected = items @ head[:, :-1].T + head[:, -1]
    torch.testing.assert_close(head_to_linear(head)(items), expected)
    setfit_head = head_to_setfit_head(head, {"temperature": 0.5})
    torch.testing.assert_close(setfit_head(items)[0], expected, rtol=1e-5, atol=1e-6)
    from setfit.modeling import SetFitHead

    existing = SetFitHead(in_features=DIM, out_features=4)
    assert head_to_setfit_head(head, existing) is existing
    torch.testing.assert_close(existing(items)[0], expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"needs \(4, 8\) with a bias.*SetFitHead\(in_features=8, out_features=4\)"):
        head_to_setfit_head(head, SetFitHead(in_features=DIM, out_features=3))
    with pytest.raises(ValueError, match="index a draw first"):
        head_to_linear(torch.randn(2, 4, DIM + 1))


def test_a_generated_head_makes_a_working_setfit_model(tmp_path):
    pytest.importorskip("setfit")
    from test_backbones import tiny_sentence_transformer, write_tiny_bert

    body = tiny_sentence_transformer(write_tiny_bert(tmp_path / "bert"))
    texts = ["alpha beta", "gamma", "delta epsilon zeta"]
    embeddings = torch.as_tensor(body.encode(texts))
    head = torch.randn(3, embeddings.shape[1] + 1, generator=torch.Generator().manual_seed(0))
    model = head_to_setfit_model(head, body, labels=["neg", "neu", "pos"])
    expected = (embeddings @ head[:, :-1].T + head[:, -1]).softmax(-1)
    torch.testing.assert_close(torch.as_tensor(model.predict_proba(texts)), expected, rtol=1e-4, atol=1e-5)
    assert list(model.predict(texts)) == [["neg", "neu", "pos"][i] for i in expected.argmax(-1).tolist()]
    with pytest.raises(ValueError, match="one name per row"):
        head_to_setfit_model(head, body, labels=["neg", "pos"])


@pytest.mark.parametrize("support, labels, match", [
    (torch.randn(6, DIM), torch.tensor([0, 0, 1, 1, 3, 3]), r"every label 0..N-1 .* no item labelled 2\. Relabel"),
    (torch.randn(6, DIM), torch.tensor([0, 0, 1, 1, -1, 2]), "negative labels"),
    (torch.randn(6, DIM), torch.tensor([0.0, 0, 1, 1, 2, 2]), "integer class indices"),
    (torch.randn(4, DIM), torch.zeros(4, dtype=torch.long), r"2..6 classes; the support has N = 1"),
    (torch.randn(7, DIM), torch.arange(7), r"at most 6 classes, or train a generator with McDiConfig\(max_num_classes=7\)"),
    (torch.randn(6, DIM + 1), torch.arange(6), f"size {DIM + 1} but this generator was trained on {DIM}-d embeddings"),
    (torch.randn(6, DIM), torch.arange(5), r"must be \(N·K, d\) or \(B, N·K, d\)"),
], ids=["missing-label", "negative", "float-labels", "one-class", "too-many-classes", "wrong-dim", "shape-mismatch"])
def test_bad_support_is_refused_with_the_fix(support, labels, match):
    with pytest.raises(ValueError, match=match):
        tiny_generator().generate_heads(support, labels)


def test_bad_settings_are_refused_with_the_fix():
    model = tiny_generator()
    support, labels = support_set()
    with pytest.raises(ValueError, match="num_samples must be an integer >= 1"):
        model.generate_heads(support, labels, num_samples=0)
    with pytest.raises(ValueError, match=r"noise must have the shape of the heads, \(1, 2, 4, 9\)"):
        model.generate_heads(support, labels, num_samples=2, noise=torch.randn(2, 4, DIM + 1))
    with pytest.raises(ValueError, match=r"choose num_targets among \[1, 3, 7, 21\]"):
        McDiConfig(num_targets=4)
    with pytest.raises(ValueError, match="mvdi.*num_targets must be 1"):
        McDiConfig(loss_type="mvdi", num_targets=3)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        McDiConfig(loss_type="ddpm")
    with pytest.raises(ValueError, match=r"unknown keys \['width'\]"):
        McDiConfig(denoiser_config={"width": 3})
    with pytest.raises(ValueError, match="leave num_targets unset"):
        McDiTrainingArguments(loss_type="mvdi", num_targets=3)
    with pytest.raises(ValueError, match="leave gradient_accumulation_steps unset"):
        McDiTrainingArguments(reptile=True, gradient_accumulation_steps=2)
    with pytest.raises(ValueError, match="meta_optimizer must be one of"):
        McDiTrainingArguments(meta_optimizer="rmsprop")


def test_corrupt_weights_are_refused(tmp_path):
    tiny_generator().save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        McDiHeadGenerator.from_pretrained(tmp_path)

"""The fast harvest kernels equal the reference: ``torch.optim`` on the ``(batch, out, in)`` deltas (today's path)
and the official per-sample loop (a deep copy per sample, the optimizer on the layer's weight alone)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import image_batch, tabular_batch, text_batch, tiny_bert, tiny_deit, tiny_mlp
from helpers.harvest_fixtures import CASES as HARVEST_CASES
from helpers.harvest_fixtures import build_backbone, build_dataset
from helpers.models import tiny_mlp as helper_tiny_mlp
from torch import nn
from torch.nn import functional as F
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

from ocd_hf import LeNet5Config, LeNet5ForImageClassification, find_target_linear, model_output_tensor
from ocd_hf.finetune import OPTIMIZERS, closed_form_deltas, optimise_deltas, overfit_deltas, overfit_head_deltas, per_sample_task_loss
from ocd_hf.methods.ocd import harvest as harvest_module
from ocd_hf.methods.ocd.deltas import load_harvest_metadata
from ocd_hf.methods.ocd.harvest import rank1_energy
from ocd_hf.target import inject_deltas

LR, STEPS = 5e-4, 3


def lenet(seed: int = 0) -> LeNet5ForImageClassification:
    torch.manual_seed(seed)
    return LeNet5ForImageClassification(LeNet5Config(num_channels=1, image_size=28)).eval()


def lenet_batch(batch: int = 6, seed: int = 1) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(seed))}


def labels_for(model: nn.Module, batch: int, seed: int = 2) -> torch.Tensor:
    if model.config.num_labels == 1:
        return torch.randn(batch, generator=torch.Generator().manual_seed(seed))
    return torch.randint(0, model.config.num_labels, (batch,), generator=torch.Generator().manual_seed(seed))


def task_of(model: nn.Module) -> str:
    return "regression" if model.config.num_labels == 1 else "classification"


def per_sample_reference(model: nn.Module, target: str, inputs: dict, labels: torch.Tensor, optimizer: str) -> torch.Tensor:
    """The official loop: for each sample, a deep copy whose target weight alone ``optimizer`` steps on that sample."""
    deltas = []
    loss_fn = per_sample_task_loss(task_of(model))
    for index in range(labels.shape[0]):
        copied = copy.deepcopy(model)
        _, layer = find_target_linear(copied, target)
        for parameter in copied.parameters():
            parameter.requires_grad_(parameter is layer.weight)
        base = layer.weight.detach().clone()
        opt = OPTIMIZERS[optimizer]([layer.weight], lr=LR)
        sample = {name: value[index : index + 1] for name, value in inputs.items()}
        for _ in range(STEPS):
            opt.zero_grad()
            loss_fn(model_output_tensor(copied(**sample)), labels[index : index + 1]).sum().backward()
            opt.step()
        deltas.append(layer.weight.detach() - base)
    return torch.stack(deltas)


def optimizer_path(model: nn.Module, target: str, inputs: dict, labels: torch.Tensor, optimizer: str):
    """Today's general path: ``torch.optim`` stepping the ``(batch, out, in)`` deltas injected into the layer."""
    _, layer = find_target_linear(model, target)

    def forward(delta):
        with inject_deltas(layer, delta):
            return model_output_tensor(model(**inputs))

    return optimise_deltas(forward, layer.weight, labels, task_of(model), optimizer, LR, STEPS, None, True)


def assert_deltas_close(actual: torch.Tensor, expected: torch.Tensor, weight: torch.Tensor | None = None) -> None:
    """Equal up to float32 rounding, relative to the largest entry; against the per-sample loop (``weight`` given)
    also up to a few ulps of the weight, since that loop stores ``W + Δ`` and reads the delta back as a difference."""
    scale = expected.abs().amax()
    assert scale > 0
    atol = 2e-5 * scale + (0 if weight is None else 4 * torch.finfo(torch.float32).eps * weight.detach().abs().amax())
    torch.testing.assert_close(actual, expected, rtol=0, atol=float(atol))


def deep_mlp(seed: int = 0) -> nn.Module:
    return helper_tiny_mlp(seed, in_features=6, hidden_size=12, num_hidden_layers=3).eval()


CASES = {
    "lenet-fc2": (lenet, lenet_batch, "fc2", "closed_form_split"),
    "lenet-fc3-head": (lenet, lenet_batch, "fc3", "closed_form_head"),
    "bert-classifier-head": (tiny_bert, text_batch, "classifier", "closed_form_head"),
    "bert-pooler": (tiny_bert, text_batch, "pooler.dense", "closed_form_split"),
    "mlp-regression-fc1": (tiny_mlp, tabular_batch, "fc1", "closed_form"),  # the first module: nothing before it to split off
    "mlp-regression-hidden-fc2": (deep_mlp, tabular_batch, "fc2", "closed_form_split"),
    "mlp-regression-head": (tiny_mlp, tabular_batch, "head", "closed_form_head"),
}


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_closed_form_equals_the_optimizer_path_and_the_per_sample_loop(case, optimizer):
    build, batch, target, path = CASES[case]
    model, inputs = build(), batch()
    labels = labels_for(model, next(iter(inputs.values())).shape[0])
    _, layer = find_target_linear(model, target)
    result = overfit_deltas(model, layer, inputs, labels, task=task_of(model), optimizer=optimizer, lr=LR, steps=STEPS,
                            return_trajectory=True)
    assert result.path == path
    reference = optimizer_path(model, target, inputs, labels, optimizer)
    assert_deltas_close(result.deltas, reference.deltas)
    for step in range(STEPS):
        assert_deltas_close(result.trajectory[:, step], reference.trajectory[:, step])
    torch.testing.assert_close(result.loss_before, reference.loss_before)
    torch.testing.assert_close(result.loss_after, reference.loss_after, rtol=1e-5, atol=1e-6)
    assert_deltas_close(result.deltas, per_sample_reference(model, target, inputs, labels, optimizer), layer.weight)
    assert not any(parameter.grad is not None for parameter in model.parameters())


def test_closed_form_keeps_adams_eps_where_an_input_is_tiny():
    """An input entry far below eps/|δ| gets a step well under lr: the closed form must not drop eps (a rank-1
    ``u sign(x)ᵀ`` would give it the full ±lr)."""
    model, inputs = tiny_bert(), text_batch()
    labels = labels_for(model, 4)
    _, layer = find_target_linear(model, "classifier")
    captured = {}
    handle = layer.register_forward_pre_hook(lambda module, args: captured.setdefault("x", args[0]))
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    x = captured["x"].clone()
    x[:, 0] = 1e-9  # Adam's step on this column is lr·|x|/(|x|+eps): about lr/11, not lr
    base_output = x @ layer.weight.T + layer.bias
    closed = closed_form_deltas(lambda shift: base_output + shift, x, 3, labels, "classification", "adam", LR, STEPS, None, False)
    reference = overfit_head_deltas(x, base_output, labels, optimizer="adam", lr=LR, steps=STEPS)
    assert_deltas_close(closed.deltas, reference.deltas)
    assert closed.deltas[:, :, 0].abs().max() < 0.2 * LR * STEPS


class Twice(nn.Module):
    """A Linear applied twice: its gradient is a sum of two δ xᵀ, not one."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.shared, self.head = nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(features)))))


def test_a_layer_called_twice_keeps_the_optimizer_path_and_matches_the_loop():
    model = Twice().eval()
    model.config = type("Config", (), {"num_labels": 3})()
    inputs = {"features": torch.randn(4, 5, generator=torch.Generator().manual_seed(0))}
    labels = torch.tensor([0, 1, 2, 0])
    result = overfit_deltas(model, model.shared, inputs, labels)
    assert result.path == "optimizer"
    assert_deltas_close(result.deltas, per_sample_reference(model, "shared", inputs, labels, "adam"), model.shared.weight)


def test_closed_form_respects_a_custom_loss():
    model, inputs = tiny_bert(), text_batch()
    labels = labels_for(model, 4)
    _, layer = find_target_linear(model, "classifier")

    def loss_fn(output, labels):
        return F.cross_entropy(output, labels, reduction="none") + output.pow(2).mean(1)

    closed = overfit_deltas(model, layer, inputs, labels, loss_fn=loss_fn)
    assert closed.path == "closed_form_head"

    def forward(delta):
        with inject_deltas(layer, delta):
            return model_output_tensor(model(**inputs))

    reference = optimise_deltas(forward, layer.weight, labels, "classification", "adam", LR, STEPS, loss_fn, False)
    assert_deltas_close(closed.deltas, reference.deltas)


@pytest.mark.parametrize("shape", [(84, 120), (120, 84), (2, 384), (40, 10)])  # direct products, then the Gram path
def test_rank1_energy_power_iteration_equals_the_float64_spectrum(shape, monkeypatch):
    gram_path = []
    original = harvest_module.gram_rank1_energy
    monkeypatch.setattr(harvest_module, "gram_rank1_energy", lambda deltas, *args: gram_path.append(len(deltas)) or original(deltas, *args))
    generator = torch.Generator().manual_seed(0)
    out, inp = shape
    near_rank1 = torch.randn(16, out, 1, generator=generator) * torch.randn(16, 1, inp, generator=generator)
    near_rank1 = near_rank1 + 1e-2 * torch.randn(16, out, inp, generator=generator)
    # Two equal top singular values: power iteration cannot converge, the eigensolver answers.
    tied = torch.zeros(2, out, inp)
    tied[:, 0, 0] = tied[:, 1, 1] = 1.0
    deltas = torch.cat([near_rank1, torch.randn(8, out, inp, generator=generator), tied, torch.zeros(1, out, inp)])
    spectrum = torch.linalg.svdvals(deltas.double()).pow(2)
    expected = torch.where(spectrum.sum(-1) > 0, spectrum[:, 0] / spectrum.sum(-1).clamp_min(1e-300), 1.0).float()
    energy = rank1_energy(deltas)
    torch.testing.assert_close(energy, expected, rtol=0, atol=1e-5)
    assert energy[-1] == 1.0 and abs(float(energy[-3]) - 0.5) < 1e-6
    assert rank1_energy(deltas[:0]).shape == (0,)  # a batch whose samples were all skipped
    if min(shape) <= harvest_module.GRAM_SIDE:
        assert sum(gram_path) == len(deltas)
    else:  # the nearly rank-1 ones converge on the direct products; only some random ones need the Gram
        assert 0 < sum(gram_path) <= 8


@pytest.mark.parametrize("chosen", ["factorised", "full"])
def test_auto_storage_reuses_the_batch_it_overfitted_to_decide(tmp_path, monkeypatch, chosen):
    kind, target = HARVEST_CASES["bert-classifier"]
    backbone, dataset = build_backbone(kind), build_dataset(kind, 7)
    # factor_tolerance=0: no residual is within it, so "auto" picks full storage.
    tolerance = {"factorised": harvest_module.DEFAULT_FACTOR_TOLERANCE, "full": 0.0}[chosen]
    calls = []
    original = harvest_module.overfit_batch
    monkeypatch.setattr(harvest_module, "overfit_batch", lambda *args, **kwargs: calls.append(len(args[3])) or original(*args, **kwargs))
    auto = harvest_module.harvest_deltas(backbone, dataset, target, tmp_path / "auto", batch_size=4, factor_tolerance=tolerance,
                                         progress=False)
    assert load_harvest_metadata(tmp_path / "auto")["harvest_config"]["delta_storage"] == chosen
    assert calls == [4, 3]  # the first batch once (to decide), then the rest
    forced = harvest_module.harvest_deltas(backbone, dataset, target, tmp_path / "forced", batch_size=4, delta_storage=chosen,
                                           progress=False)
    stored = ("delta_factor", "factor_residual") if chosen == "factorised" else ("delta", "rank1_energy")
    for column in ("id", "rho", "layer_input", "loss_after", *stored):
        torch.testing.assert_close(auto.with_format("torch")[:][column], forced.with_format("torch")[:][column], rtol=0, atol=0)


def test_default_batch_size_follows_the_path_and_is_recorded(tmp_path, monkeypatch):
    kind, target = HARVEST_CASES["mlp-regression"]  # one vector per sample: about AUTO_BATCH_ELEMENTS entries per batch
    backbone, dataset = build_backbone(kind), build_dataset(kind, 7)
    _, layer = find_target_linear(backbone, target)
    monkeypatch.setitem(harvest_module.AUTO_BATCH_ELEMENTS, "one_vector", 3 * layer.weight.numel())
    monkeypatch.setitem(harvest_module.AUTO_BATCH_RANGE, "one_vector", (2, 2048))
    calls = []
    original = harvest_module.harvest_batch
    monkeypatch.setattr(harvest_module, "harvest_batch", lambda *args, **kwargs: calls.append(len(args[3])) or original(*args, **kwargs))
    chosen = harvest_module.harvest_deltas(backbone, dataset, target, tmp_path / "auto", delta_storage="full", progress=False)
    assert calls == [3, 3, 1]
    recorded = load_harvest_metadata(tmp_path / "auto")["batch_size"]
    assert recorded["batch_size"] == 3 and "one vector per sample" in recorded["reason"]
    whole = harvest_module.harvest_deltas(backbone, dataset, target, tmp_path / "whole", batch_size=7, delta_storage="full", progress=False)
    assert load_harvest_metadata(tmp_path / "whole")["batch_size"] == {"batch_size": 7, "reason": "requested"}
    assert_deltas_close(chosen.with_format("torch")[:]["delta"], whole.with_format("torch")[:]["delta"])
    # A resumed harvest keeps its batch size (the first batch is part of its identity), 32 for one that recorded none.
    metadata_path = tmp_path / "whole" / "harvest.json"
    legacy = json.loads(metadata_path.read_text())
    del legacy["batch_size"]
    metadata_path.write_text(json.dumps(legacy))
    with pytest.raises(ValueError, match="first_batch_sha256"):
        harvest_module.harvest_deltas(backbone, dataset, target, tmp_path / "whole", batch_size=3, delta_storage="full", progress=False)
    harvest_module.harvest_deltas(backbone, dataset, target, tmp_path / "whole", delta_storage="full", progress=False)
    assert load_harvest_metadata(tmp_path / "whole")["batch_size"]["batch_size"] == harvest_module.FORMER_DEFAULT_BATCH_SIZE
    kind, target = HARVEST_CASES["bert-intermediate"]
    harvest_module.harvest_deltas(build_backbone(kind), build_dataset(kind, 2), target, tmp_path / "token", progress=False)
    recorded = load_harvest_metadata(tmp_path / "token")["batch_size"]
    assert recorded["batch_size"] == 128 and "per-token layer" in recorded["reason"]  # a 32 x 16 layer: the range's top


def two_layer_bert(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, num_labels=3)
    return BertForSequenceClassification(config).eval()


def tiny_llama(seed: int = 0) -> nn.Module:
    """A decoder (its forward builds a key/value cache and rotary embeddings) that classifies from the last token."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, num_labels=3, pad_token_id=0)
    return LlamaForSequenceClassification(config).eval()


def token_batch(batch: int = 4, seed: int = 1) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(1, 50, (batch, 6), generator=torch.Generator().manual_seed(seed))}


SPLIT_CASES = {
    **{case: CASES[case] for case in ("lenet-fc2", "bert-pooler", "mlp-regression-hidden-fc2")},
    # Per-token layers: the residual around the MLP reads the attention block's output, served from the cache.
    # In the last layer only the CLS token reaches the classifier: the deltas are rank-1, in closed form.
    "bert-last-layer-intermediate": (tiny_bert, text_batch, "bert.encoder.layer.0.intermediate.dense", "closed_form_token_split"),
    # (the MLP's output layer: named deit.encoder.layer.0.output.dense before transformers 5.x renamed it)
    "deit-last-layer-mlp-fc2": (tiny_deit, image_batch, r"deit\.(layers\.0\.mlp\.fc2|encoder\.layer\.0\.output\.dense)", "closed_form_token_split"),
    # Below the last layer every token reaches the loss (through attention): the optimizer path.
    "bert-first-of-two-layers-intermediate": (two_layer_bert, text_batch, "bert.encoder.layer.0.intermediate.dense", "optimizer_split"),
    "llama-first-of-two-layers-down-proj": (tiny_llama, token_batch, "model.layers.0.mlp.down_proj", "optimizer_split"),
    "llama-last-layer-down-proj": (tiny_llama, token_batch, "model.layers.1.mlp.down_proj", "closed_form_token_split"),
}


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
@pytest.mark.parametrize("case", sorted(SPLIT_CASES))
def test_the_split_at_the_target_runs_the_prefix_once_and_equals_full_passes_and_the_loop(case, optimizer, monkeypatch):
    build, batch, target, path = SPLIT_CASES[case]
    model, inputs = build(), batch()
    labels = labels_for(model, next(iter(inputs.values())).shape[0])
    _, layer = find_target_linear(model, target)
    first = next(module for module in model.modules() if not list(module.children()))  # the first leaf module
    runs, original = [], type(first).forward  # its forward's real executions (its hooks also fire on a replayed call)
    monkeypatch.setattr(type(first), "forward", lambda self, *args, **kwargs: runs.append(self is first) or original(self, *args, **kwargs))
    settings = {"task": task_of(model), "optimizer": optimizer, "lr": LR, "steps": STEPS, "return_trajectory": True}
    split = overfit_deltas(model, layer, inputs, labels, **settings)
    assert split.path == path
    assert sum(runs) == 1  # the base pass only
    runs.clear()
    full = overfit_deltas(model, layer, inputs, labels, split_prefix=False, **settings)
    assert full.path == path.replace("_split", "") and sum(runs) == STEPS + 2
    torch.testing.assert_close(split.trajectory, full.trajectory, rtol=0, atol=0)  # the same operations on the same values
    torch.testing.assert_close(split.loss_after, full.loss_after, rtol=0, atol=0)
    reference = optimizer_path(model, target, inputs, labels, optimizer)  # torch.optim on the (batch, out, in) deltas
    for step in range(STEPS):
        assert_deltas_close(split.trajectory[:, step], reference.trajectory[:, step])
    torch.testing.assert_close(split.loss_after, reference.loss_after, rtol=1e-5, atol=1e-6)
    assert_deltas_close(split.deltas, per_sample_reference(model, target, inputs, labels, optimizer), layer.weight)


def test_the_split_keeps_hooks_on_the_modules_before_the_target_applied_once():
    model, inputs = lenet(), lenet_batch()
    labels = labels_for(model, 6)
    handle = model.fc1.register_forward_hook(lambda module, args, output: output * 2 + 1)  # runs again on a replayed call
    try:
        split = overfit_deltas(model, model.fc2, inputs, labels)
        full = overfit_deltas(model, model.fc2, inputs, labels, split_prefix=False)
    finally:
        handle.remove()
    assert split.path == "closed_form_split"
    torch.testing.assert_close(split.deltas, full.deltas, rtol=0, atol=0)
    torch.testing.assert_close(split.loss_after, full.loss_after, rtol=0, atol=0)


class InPlaceResidual(nn.Module):
    """``fc1``'s output is the residual that ``fc2``'s output is added to *in place*: a replay would read it changed."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.head = nn.Linear(5, 5), nn.Linear(5, 5), nn.Linear(5, 3)
        self.config = type("Config", (), {"num_labels": 3})()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        hidden = self.fc1(features)
        hidden += torch.tanh(self.fc2(torch.tanh(hidden)))
        return self.head(hidden)


class Branching(nn.Module):
    """Control flow before the target that depends on the pass (here, on grad mode): a replay cannot follow it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first, self.second, self.fc, self.head = nn.Linear(5, 5), nn.Linear(5, 5), nn.Linear(5, 5), nn.Linear(5, 3)
        self.config = type("Config", (), {"num_labels": 3})()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        hidden = self.first(features) if torch.is_grad_enabled() else self.second(features)
        return self.head(torch.tanh(self.fc(torch.tanh(hidden))))


@pytest.mark.parametrize("model_class, target", [(InPlaceResidual, "fc2"), (Branching, "fc")])
def test_a_prefix_that_cannot_be_replayed_falls_back_to_full_passes(model_class, target, library_logs):
    model = model_class().eval()
    inputs = {"features": torch.randn(4, 5, generator=torch.Generator().manual_seed(0))}
    labels = torch.tensor([0, 1, 2, 0])
    with library_logs.at_level("INFO", logger="ocd_hf"):
        result = overfit_deltas(model, getattr(model, target), inputs, labels)
    assert result.path == "closed_form"
    assert "not the split at the target layer" in library_logs.text
    if model_class is InPlaceResidual:  # (Branching's loop runs under grad, the harvest's base pass without: no reference)
        assert_deltas_close(result.deltas, per_sample_reference(model, target, inputs, labels, "adam"), getattr(model, target).weight)


class LateToken(nn.Module):
    """Token 1 of ``fc``'s output reaches the loss only once it has moved from its value under the original weights
    (``frozen``, a copy): its gradient is zero at the first step and not after it, so the one-token closed form must
    notice and give way to the optimizer path."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.fc, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)
        self.frozen = copy.deepcopy(self.fc)
        self.config = type("Config", (), {"num_labels": 3})()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        embedded = torch.tanh(self.embed(features))
        hidden = self.fc(embedded)
        gate = torch.relu((hidden[:, 1] - self.frozen(embedded[:, 1])).abs().sum(-1) - 1e-7)
        return self.head(hidden[:, 0]) + 100 * gate[:, None] * torch.tensor([1.0, 0.0, 0.0])


def test_a_second_token_that_reaches_the_loss_after_the_first_step_gives_way_to_the_optimizer_path():
    model = LateToken().eval()
    inputs = {"features": torch.randn(4, 2, 4, generator=torch.Generator().manual_seed(0))}
    labels = torch.tensor([0, 1, 2, 0])
    result = overfit_deltas(model, model.fc, inputs, labels, return_trajectory=True)
    assert result.path == "optimizer_split"
    assert result.trajectory[:, 1:].abs().amax() > 0 and (result.trajectory[:, -1] != result.trajectory[:, 0]).any()
    assert_deltas_close(result.deltas, per_sample_reference(model, "fc", inputs, labels, "adam"), model.fc.weight)

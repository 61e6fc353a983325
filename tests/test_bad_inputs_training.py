"""Bad inputs to training, generation, evaluation and loading: each case (a call) raises the expected exception type
with a message naming the argument or the file, before any work or write; plus the evaluation's chunking of large
batches and its rows for a deterministic generator."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from conftest import TINY_DENOISER, tabular_batch, text_batch, tiny_bert, tiny_mlp
from helpers.mcdi import gaussian_distribution, support_set, tiny_generator
from test_training import harvest_tiny

from ocd_hf import OCDWrapper
from ocd_hf.episodes import EpisodeSampler
from ocd_hf.fewshot import evaluate_episodes
from ocd_hf.finetune import overfit_deltas
from ocd_hf.methods.mcdi import McDiHeadGenerator, McDiTrainingArguments, train_head_generator
from ocd_hf.methods.ocd.evaluation import evaluate_ocd
from ocd_hf.methods.ocd.layer_selection import select_layer
from ocd_hf.methods.ocd.training import OCDTrainingArguments, train_hypernetwork

TINY_OVERRIDES = {"delta_mode": "full", "denoiser_config": TINY_DENOISER, "condition_hidden_dim": 16}


@dataclass
class Context:
    """What the cases call into: an untrained OCD wrapper on a tiny BERT head and one on a tiny MLP, their inputs,
    a Mc-Di generator, a delta dataset and a scratch directory."""

    ocd: OCDWrapper
    inputs: dict[str, torch.Tensor]
    mlp: OCDWrapper
    mlp_inputs: dict[str, torch.Tensor]
    mcdi: McDiHeadGenerator
    deltas: tuple
    tmp: Path

    def unwritable(self) -> Path:
        """A path that cannot become a directory: it lies under a file."""
        blocker = self.tmp / "a-file"
        blocker.write_text("not a directory")
        return blocker / "output"

    def data(self, labels: Any) -> list:
        """One evaluation batch with ``labels``."""
        return [(self.inputs, torch.as_tensor(labels))]


@pytest.fixture(scope="module")
def shared():
    backbone, inputs = tiny_bert(), text_batch()
    ocd = OCDWrapper.attach(backbone, "classifier", example_inputs=inputs, denoiser_config=TINY_DENOISER, condition_hidden_dim=16,
                            num_inference_steps=2)
    mlp_inputs = tabular_batch()
    mlp = OCDWrapper.attach(tiny_mlp(), "fc1", example_inputs=mlp_inputs, denoiser_config=TINY_DENOISER, condition_hidden_dim=16,
                            num_inference_steps=2)
    return ocd, inputs, mlp, mlp_inputs, tiny_generator(), harvest_tiny(tiny_bert(), num_samples=16)


@pytest.fixture
def ctx(shared, tmp_path):
    return Context(*shared, tmp_path)


def with_nan(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    features = values["features"].clone()
    features[2, 1] = float("nan")
    return {**values, "features": features}


def cond(ctx: Context):
    return ctx.ocd.conditioning(**ctx.inputs)


def episodes():
    """Four 3-way 1-shot episodes of Gaussian classes."""
    return EpisodeSampler(gaussian_distribution(num_classes=6, dim=4), 3, 1, q_queries=2, seed=0).sample(4, column="embedding")


def labels_with(value: Any) -> torch.Tensor:
    labels = torch.tensor([0, 1, 2, 1])
    labels[2] = value
    return labels


# id -> (call, exception type, phrase of the message)
CASES: dict[str, tuple[Callable[[Context], Any], type[Exception], str]] = {
    # generation: OCD
    "generate-steps-minus-1": (lambda c: c.ocd.generate_deltas(cond(c), num_inference_steps=-1), ValueError, "num_inference_steps"),
    "generate-steps-0": (lambda c: c.ocd.generate_deltas(cond(c), num_inference_steps=0), ValueError, "num_inference_steps"),
    "generate-steps-float": (lambda c: c.ocd.generate_deltas(cond(c), num_inference_steps=2.5), TypeError, "num_inference_steps"),
    "forward-steps-0": (lambda c: c.ocd(**c.inputs, num_inference_steps=0), ValueError, "num_inference_steps"),
    "forward-generator-int": (lambda c: c.ocd(**c.inputs, generator=0), TypeError, r"torch\.Generator\(\)\.manual_seed\(0\)"),
    "generate-generator-int": (lambda c: c.ocd.generate_deltas(cond(c), generator=0), TypeError, "generator must be a torch.Generator"),
    "forward-num-samples-0": (lambda c: c.ocd(**c.inputs, num_samples=0), ValueError, "num_samples"),
    "forward-num-samples-float": (lambda c: c.ocd(**c.inputs, num_samples=1.5), TypeError, "num_samples"),
    "forward-labels-fractional": (lambda c: c.ocd(**c.inputs, labels=torch.tensor([0.0, 1.5, 2.0, 1.0])), ValueError, r"labels.*1\.5"),
    "forward-labels-ignore-index": (lambda c: c.ocd(**c.inputs, labels=labels_with(-100)), ValueError, r"-100.*row\(s\) \[2\]"),
    "forward-labels-out-of-range": (lambda c: c.ocd(**c.inputs, labels=labels_with(7)), ValueError, r"\[0, 3\).*row\(s\) \[2\]"),
    "forward-input-ids-float": (lambda c: c.ocd(**{**c.inputs, "input_ids": c.inputs["input_ids"].float()}), ValueError, "input_ids"),
    "forward-input-ids-3d": (lambda c: c.ocd(**{**c.inputs, "input_ids": c.inputs["input_ids"][None]}), ValueError, "input_ids"),
    "forward-out-of-vocabulary": (lambda c: c.ocd(**{**c.inputs, "input_ids": c.inputs["input_ids"] + 1000}), ValueError, "input_ids"),
    "forward-sequence-too-long": (lambda c: c.ocd(input_ids=torch.ones(2, 600, dtype=torch.long), attention_mask=torch.ones(2, 600, dtype=torch.long)),
                                  ValueError, r"input_ids \(2, 600\) int64.*max_position_embeddings = 512"),
    "forward-nan-features": (lambda c: c.mlp(**with_nan(c.mlp_inputs)), ValueError, r"'features'.*NaN.*row\(s\) \[2\]"),
    "generate-conditioning-of-another-layer": (lambda c: c.ocd.generate_deltas(c.mlp.conditioning(**c.mlp_inputs)), ValueError, "conditioning"),
    "predict-proba-batch-size-0": (lambda c: c.ocd.predict_proba(["a text"], batch_size=0), ValueError, "batch_size"),
    # generation: Mc-Di
    "heads-generator-int": (lambda c: c.mcdi.generate_heads(*support_set(), generator=0), TypeError, "generator"),
    "heads-nan-support": (lambda c: c.mcdi.generate_heads(support_set()[0].nan_to_num(0).index_fill(1, torch.tensor([3]), float("nan")),
                                                          support_set()[1]), ValueError, "NaN"),
    "heads-fractional-labels": (lambda c: c.mcdi.generate_heads(support_set()[0], support_set()[1] + 0.5), ValueError, "integer"),
    "heads-ignore-index": (lambda c: c.mcdi.generate_heads(support_set()[0], support_set()[1].index_fill(1, torch.tensor([0]), -100)),
                           ValueError, "-100"),
    # training settings
    "lr-nan": (lambda c: OCDTrainingArguments(learning_rate=float("nan")), ValueError, "learning_rate"),
    "lr-negative": (lambda c: OCDTrainingArguments(learning_rate=-1e-3), ValueError, "learning_rate"),
    "lr-zero": (lambda c: McDiTrainingArguments(learning_rate=0.0), ValueError, "learning_rate"),
    "weight-decay-negative": (lambda c: OCDTrainingArguments(weight_decay=-0.1), ValueError, "weight_decay"),
    "max-grad-norm-zero": (lambda c: OCDTrainingArguments(max_grad_norm=0.0), ValueError, "max_grad_norm"),
    "batch-size-0": (lambda c: OCDTrainingArguments(batch_size=0), ValueError, "batch_size"),
    "batch-size-float": (lambda c: OCDTrainingArguments(batch_size=2.5), TypeError, "batch_size"),
    "inner-lr-nan": (lambda c: McDiTrainingArguments(inner_lr=float("nan")), ValueError, "inner_lr"),
    "meta-lr-negative": (lambda c: McDiTrainingArguments(meta_lr=-1.0), ValueError, "meta_lr"),
    "train-into-unwritable-dir": (lambda c: train_hypernetwork(c.deltas, c.ocd.backbone, c.unwritable(), config_overrides=TINY_OVERRIDES,
                                                               num_steps=1, progress=False), ValueError, "output_dir.*not a writable directory"),
    "train-heads-into-unwritable-dir": (lambda c: train_head_generator(c.tmp / "no-heads", c.unwritable(), num_steps=1), ValueError,
                                        "output_dir.*not a writable directory"),
    # evaluation
    "evaluate-into-unwritable-dir": (lambda c: evaluate_ocd(c.ocd, c.data([0, 1, 2, 1]), output_dir=c.unwritable(), progress=False),
                                     ValueError, "output_dir.*not a writable directory"),
    "evaluate-batch-size-0": (lambda c: evaluate_ocd(c.ocd, c.data([0, 1, 2, 1]), batch_size=0, progress=False), ValueError, "batch_size"),
    "evaluate-steps-0": (lambda c: evaluate_ocd(c.ocd, c.data([0, 1, 2, 1]), num_inference_steps=0, progress=False), ValueError,
                         "num_inference_steps"),
    "evaluate-labels-ignore-index": (lambda c: evaluate_ocd(c.ocd, c.data(labels_with(-100)), progress=False), ValueError, r"-100.*row"),
    "select-layer-into-unwritable-dir": (lambda c: select_layer(c.ocd.backbone, c.inputs, torch.tensor([0, 1, 2, 1]), ["classifier"],
                                                                num_draws=2, output_dir=c.unwritable(), progress=False),
                                         ValueError, "output_dir.*not a writable directory"),
    "few-shot-evaluation-into-unwritable-dir": (lambda c: evaluate_episodes(episodes(), {}, output_dir=c.unwritable()), ValueError,
                                                "output_dir.*not a writable directory"),
    # the shared per-sample fit (harvests, oracles)
    "overfit-labels-ignore-index": (lambda c: overfit_deltas(c.ocd.backbone, c.ocd.target_layer, c.inputs, labels_with(-100)), ValueError,
                                    r"-100.*row\(s\) \[2\]"),
    "overfit-labels-fractional": (lambda c: overfit_deltas(c.ocd.backbone, c.ocd.target_layer, c.inputs, torch.tensor([0.0, 1.0, 1.5, 2.0])),
                                  ValueError, "1.5"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_gets_a_clear_error(ctx, case):
    call, error, phrase = CASES[case]
    with pytest.raises(error, match=phrase):
        call(ctx)


def test_unwritable_output_dir_fails_before_the_work(ctx, monkeypatch):
    from ocd_hf.methods.ocd import training

    def no_work(*args, **kwargs):
        raise AssertionError("the work started before the output directory was checked")

    monkeypatch.setattr(training, "scan_deltas", no_work)
    monkeypatch.setattr(training, "resolve_deltas", no_work)
    with pytest.raises(ValueError, match="not a writable directory"):
        train_hypernetwork(ctx.deltas, ctx.ocd.backbone, ctx.unwritable(), config_overrides=TINY_OVERRIDES, num_steps=1, progress=False)


# ----- saved weights ------------------------------------------------------------------------------------


def flip_a_bit(weights: Path) -> None:
    """Flip the lowest mantissa bit of the file's last float32: same size, every value finite."""
    data = bytearray(weights.read_bytes())
    data[-4] ^= 1
    weights.write_bytes(bytes(data))


def test_a_bit_flipped_ocd_weights_file_is_refused(ctx):
    ctx.ocd.save_pretrained(ctx.tmp)
    flip_a_bit(ctx.tmp / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.safetensors.*sha256.*save or push the model again"):
        OCDWrapper.from_pretrained(ctx.tmp, backbone=ctx.ocd.backbone)


def test_a_bit_flipped_mcdi_weights_file_is_refused(ctx):
    ctx.mcdi.save_pretrained(ctx.tmp)
    flip_a_bit(ctx.tmp / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.safetensors.*sha256"):
        McDiHeadGenerator.from_pretrained(ctx.tmp)


def test_weights_saved_without_a_checksum_load_with_a_warning(ctx, library_logs):
    ctx.ocd.save_pretrained(ctx.tmp)
    config = json.loads((ctx.tmp / "config.json").read_text())
    assert len(config.pop("weights_sha256")) == 64
    (ctx.tmp / "config.json").write_text(json.dumps(config))
    with library_logs.at_level(logging.WARNING, logger="ocd_hf"):
        loaded = OCDWrapper.from_pretrained(ctx.tmp, backbone=ctx.ocd.backbone)
    assert "no weights_sha256" in library_logs.text
    for key, value in ctx.ocd.hypernetwork.state_dict().items():
        assert torch.equal(loaded.hypernetwork.state_dict()[key], value)


def test_a_config_without_layer_fingerprint_does_not_load_onto_another_layer(ctx):
    ctx.ocd.save_pretrained(ctx.tmp)
    config = json.loads((ctx.tmp / "config.json").read_text())
    config["base_layer_fingerprint"] = None
    (ctx.tmp / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="base_layer_fingerprint"):
        OCDWrapper.from_pretrained(ctx.tmp, backbone=tiny_bert(seed=5))
    OCDWrapper.from_pretrained(ctx.tmp, backbone=tiny_bert(seed=5), strict_fingerprint=False)  # the documented way round


# ----- evaluation ---------------------------------------------------------------------------------------


def test_evaluation_in_chunks_equals_evaluation_in_one_piece(ctx):
    generator = torch.Generator().manual_seed(3)
    inputs = {"input_ids": torch.randint(1, 50, (10, 6), generator=generator), "attention_mask": torch.ones(10, 6, dtype=torch.long)}
    data = [(inputs, torch.randint(0, 3, (10,), generator=generator))]
    settings = dict(seeds=(0, 1), num_samples=3, rows=["base", "ocd_1", "ocd_ens3", "oracle"], progress=False)
    whole = evaluate_ocd(ctx.ocd, data, max_chunk_size=None, **settings)
    chunked = evaluate_ocd(ctx.ocd, data, max_chunk_size=4, **settings)
    assert chunked.metadata["max_chunk_size"] == 4
    for row in whole.rows:
        other = chunked[row.name]
        assert other.values.keys() == row.values.keys()
        for metric, runs in row.values.items():
            assert runs == pytest.approx(other.values[metric], rel=1e-5, abs=1e-6), (row.name, metric)


def test_a_deterministic_generator_is_evaluated_once_not_as_identical_seeds():
    backbone, inputs = tiny_bert(), text_batch()
    regression = OCDWrapper.attach(backbone, "classifier", example_inputs=inputs, generator_type="regression", condition_hidden_dim=16)
    table = evaluate_ocd(regression, [(inputs, torch.tensor([0, 1, 2, 1]))], seeds=(0, 1, 2), progress=False)
    names = [row.name for row in table.rows]
    assert "ocd_1" in names and "ocd_ens5" not in names and "ocd_mean5" not in names  # 5 identical draws are ocd_1 again
    assert all(row.num_runs == 1 for row in table.rows)  # one run per row: no "± 0.0000"
    assert "± 0.0000" not in table.to_markdown() and table.metadata["seeds"] == [0]
    sampled = OCDWrapper.attach(backbone, "classifier", example_inputs=inputs, denoiser_config=TINY_DENOISER, condition_hidden_dim=16,
                                num_inference_steps=2)
    assert evaluate_ocd(sampled, [(inputs, torch.tensor([0, 1, 2, 1]))], seeds=(0, 1), progress=False)["ocd_ens5"].num_runs == 2


def test_recipes_respect_a_user_set_omp_num_threads(monkeypatch):
    from ocd_options import threads_per_process

    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads_per_process(2) == 3 and threads_per_process(2, requested=5) == 5
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert threads_per_process(1) == max(1, os.cpu_count() or 1)
    for recipe in ("setfit_ocd", "deit_ocd", "lenet_ocd"):
        source = (Path(__file__).parents[1] / "recipes" / f"{recipe}.py").read_text()
        assert "torch.set_num_threads(threads_per_process(" in source and "os.cpu_count()" not in source, recipe

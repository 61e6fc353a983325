"""Training the OCD hypernetwork with Accelerate: loss decrease, validation, checkpoints and exact
resume, DDP, saved-model round trip, and clear errors for bad delta datasets."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_DENOISER, tiny_bert
from datasets import Array2D, Dataset, Features, Value
from datasets import List as ListFeature
from helpers import subprocess_env
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ocd_hf import OCDWrapper
from ocd_hf.finetune import overfit_deltas
from ocd_hf.methods.ocd.training import (
    CHECKPOINTS_DIR,
    HISTORY_NAME,
    TRAINING_STATE_NAME,
    OCDTrainingArguments,
    build_config,
    list_checkpoints,
    train_hypernetwork,
)
from ocd_hf.target import capture_conditioning, describe_backbone, find_target_linear

TINY_OVERRIDES = {"delta_mode": "full", "denoiser_config": TINY_DENOISER, "condition_hidden_dim": 16}
QUIET = {"progress": False, "learning_rate": 2e-3}


def harvest_tiny(backbone: torch.nn.Module, num_samples: int = 48, target: str = "classifier", seed: int = 0) -> tuple[Dataset, dict]:
    """A delta dataset in the shared contract, harvested from ``backbone`` with ``overfit_deltas``."""
    generator = torch.Generator().manual_seed(seed)
    inputs = {
        "input_ids": torch.randint(1, 50, (num_samples, 6), generator=generator),
        "attention_mask": torch.ones(num_samples, 6, dtype=torch.long),
    }
    labels = torch.randint(0, 3, (num_samples,), generator=generator)
    name, layer = find_target_linear(backbone, target)
    result = overfit_deltas(backbone, layer, inputs, labels)
    with torch.no_grad():
        cond = capture_conditioning(backbone, layer, inputs)
    out_f, in_f = layer.out_features, layer.in_features
    features = Features(
        {
            "id": Value("int64"),
            "label": Value("int64"),
            "delta": Array2D((out_f, in_f), "float32"),
            "rho": Value("float32"),
            "layer_input": ListFeature(Value("float32")),
            "layer_output": ListFeature(Value("float32")),
            "model_output": ListFeature(Value("float32")),
            "loss_before": Value("float32"),
            "loss_after": Value("float32"),
        }
    )
    deltas = result.deltas.detach()
    dataset = Dataset.from_dict(
        {
            "id": list(range(num_samples)),
            "label": labels.tolist(),
            "delta": deltas.numpy(),
            "rho": deltas.pow(2).mean((1, 2)).sqrt().tolist(),
            "layer_input": cond.layer_input.tolist(),
            "layer_output": cond.layer_output.tolist(),
            "model_output": cond.model_output.tolist(),
            "loss_before": result.loss_before.tolist(),
            "loss_after": result.loss_after.tolist(),
        },
        features=features,
    )
    metadata = {
        **describe_backbone(backbone, name, inputs),
        "harvest_config": {"optimizer": "adam", "lr": 5e-4, "steps": 3, "loss": "cross_entropy", "dtype": "float32", "trajectory": False},
        "num_samples": num_samples,
    }
    return dataset, metadata


@pytest.fixture(scope="module")
def backbone():
    return tiny_bert()


@pytest.fixture(scope="module")
def deltas(backbone):
    return harvest_tiny(backbone)


def history(output_dir: Path) -> dict:
    return json.loads((output_dir / HISTORY_NAME).read_text())


def hypernetwork_state(model: OCDWrapper) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.hypernetwork.state_dict().items()}


def test_training_loss_decreases_and_validation_is_logged(backbone, deltas, tmp_path):
    train_hypernetwork(
        deltas, backbone, tmp_path, config_overrides=TINY_OVERRIDES, num_steps=40, batch_size=16, logging_steps=1,
        validation_steps=20, validation_fraction=0.25, ema_decay=None, seed=0, **QUIET,
    )
    log = history(tmp_path)
    assert log["global_step"] == 40
    assert log["num_train_deltas"] == 36 and log["num_validation_deltas"] == 12
    train = [e["denoise_loss"] for e in log["log_history"] if "denoise_loss" in e]
    assert len(train) == 40
    first, last = sum(train[:8]) / 8, sum(train[-8:]) / 8
    assert last < 0.8 * first, (first, last)
    validation = [e for e in log["log_history"] if "val_denoise_loss" in e]
    assert [e["step"] for e in validation] == [20, 40]
    assert all(torch.isfinite(torch.tensor([e["val_denoise_loss"], e["val_scale_loss"]])).all() for e in validation)
    assert validation[-1]["val_denoise_loss"] < validation[0]["val_denoise_loss"]


def test_saved_model_loads_and_generates_finite_deltas(backbone, deltas, tmp_path):
    dataset, metadata = deltas
    model = train_hypernetwork(
        deltas, backbone, tmp_path, config_overrides={**TINY_OVERRIDES, "num_inference_steps": 2}, num_steps=5, batch_size=16, **QUIET
    )
    assert {"config.json", HISTORY_NAME, "model.safetensors"} <= {p.name for p in tmp_path.iterdir()}
    assert CHECKPOINTS_DIR not in {p.name for p in tmp_path.iterdir()}  # no checkpointing_steps, no checkpoints
    loaded = OCDWrapper.from_pretrained(tmp_path, backbone=backbone)
    for key, value in hypernetwork_state(model).items():
        torch.testing.assert_close(loaded.hypernetwork.state_dict()[key], value)
    # The statistics of the training deltas are in the saved config.
    rho = torch.tensor(dataset["rho"])
    assert loaded.config.log_rho_mean == pytest.approx(float(rho.log().mean()), abs=0.05)
    assert loaded.config.harvest_config["lr"] == metadata["harvest_config"]["lr"]
    encoder_mean = loaded.hypernetwork.encoders["input"].mean
    assert encoder_mean.abs().sum() > 0
    inputs = {"input_ids": torch.randint(1, 50, (2, 6)), "attention_mask": torch.ones(2, 6, dtype=torch.long)}
    cond = loaded.conditioning(**inputs)
    generated = loaded.generate_deltas(cond, num_samples=2, generator=torch.Generator().manual_seed(0))
    assert generated.shape == (2, 2, 3, 16)
    assert torch.isfinite(generated).all()


def test_resume_continues_step_count_and_matches_uninterrupted_run(backbone, deltas, tmp_path):
    settings = dict(config_overrides=TINY_OVERRIDES, batch_size=8, logging_steps=2, validation_steps=6, checkpointing_steps=6,
                    gradient_accumulation_steps=2, seed=3, **QUIET)
    uninterrupted = train_hypernetwork(deltas, backbone, tmp_path / "full", num_steps=12, **settings)
    expected = hypernetwork_state(uninterrupted)

    interrupted = tmp_path / "interrupted"
    train_hypernetwork(deltas, backbone, interrupted, num_steps=6, **settings)
    assert [checkpoint.name for checkpoint in list_checkpoints(interrupted)] == ["checkpoint-6"]
    state = json.loads((interrupted / CHECKPOINTS_DIR / "checkpoint-6" / TRAINING_STATE_NAME).read_text())
    assert state["global_step"] == 6 and state["ema"]["optimization_step"] == 6
    resumed = train_hypernetwork(deltas, backbone, interrupted, num_steps=12, resume_from_checkpoint="latest", **settings)

    log = history(interrupted)
    assert log["global_step"] == 12
    assert [e["step"] for e in log["log_history"]] == [2, 4, 6, 8, 10, 12]
    assert log["log_history"] == history(tmp_path / "full")["log_history"]
    for key, value in hypernetwork_state(resumed).items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)


def test_checkpoints_total_limit_keeps_newest(backbone, deltas, tmp_path):
    train_hypernetwork(
        deltas, backbone, tmp_path, config_overrides=TINY_OVERRIDES, num_steps=6, batch_size=16, checkpointing_steps=2,
        checkpoints_total_limit=2, validation_fraction=0.0, **QUIET,
    )
    assert [c.name for c in list_checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-6"]


def test_db_scale_loss_and_num_epochs(backbone, deltas, tmp_path):
    train_hypernetwork(
        deltas, backbone, tmp_path, config_overrides=TINY_OVERRIDES, num_epochs=2, batch_size=16, scale_loss="db",
        validation_fraction=0.0, logging_steps=1, **QUIET,
    )
    log = history(tmp_path)
    assert log["global_step"] == 2 * 3  # 48 deltas in batches of 16, no validation split
    assert all(math.isfinite(e["scale_loss"]) for e in log["log_history"])
    assert not any("val_denoise_loss" in e for e in log["log_history"])


def test_factorised_mode_trains_on_left_factors(backbone, deltas, tmp_path):
    overrides = {"delta_mode": "factorised", "factor_denoiser_config": {"hidden_dim": 32, "num_layers": 2, "embed_dim": 16},
                 "condition_hidden_dim": 16, "num_inference_steps": 2}
    model = train_hypernetwork(deltas, backbone, tmp_path, config_overrides=overrides, num_steps=40, batch_size=16,
                               logging_steps=1, validation_fraction=0.0, **QUIET)
    assert model.config.factor_rule == "sign"  # chosen from the harvest optimizer (Adam)
    train = [e["denoise_loss"] for e in history(tmp_path)["log_history"]]
    assert sum(train[-8:]) / 8 < 0.8 * sum(train[:8]) / 8
    # ρ statistics are those of the left factors u (Δ = u sign(x)ᵀ): ‖u‖_rms = ‖Δ‖_rms for a ±1 right factor.
    loaded = OCDWrapper.from_pretrained(tmp_path, backbone=backbone)
    inputs = {"input_ids": torch.randint(1, 50, (2, 6)), "attention_mask": torch.ones(2, 6, dtype=torch.long)}
    factors = loaded.generate_deltas(loaded.conditioning(**inputs), num_samples=3)
    assert factors.shape == (2, 3, 3) and torch.isfinite(factors).all()


def test_factorised_mode_refuses_deltas_that_are_not_rank1(backbone, deltas, tmp_path):
    dataset, metadata = deltas
    noisy = dataset.map(lambda row: {"delta": (torch.as_tensor(row["delta"]) + torch.randn(3, 16)).tolist()},
                        features=dataset.features)
    with pytest.raises(ValueError, match="not rank-1"):
        train_hypernetwork((noisy, metadata), backbone, tmp_path, config_overrides={"delta_mode": "factorised"},
                           num_steps=1, **QUIET)


def test_trains_from_a_harvested_directory_in_bfloat16(backbone, tmp_path):
    from ocd_hf.methods.ocd.harvest import harvest_deltas

    generator = torch.Generator().manual_seed(0)
    source = Dataset.from_dict({
        "input_ids": torch.randint(1, 50, (20, 6), generator=generator).tolist(),
        "attention_mask": [[1] * 6] * 20,
        "label": torch.randint(0, 3, (20,), generator=generator).tolist(),
    })
    harvest_deltas(backbone, source, "classifier", tmp_path / "deltas", batch_size=10, dtype="bfloat16", progress=False)
    model = train_hypernetwork(tmp_path / "deltas", backbone, tmp_path / "model", config_overrides=TINY_OVERRIDES,
                               num_steps=3, batch_size=8, **QUIET)
    assert model.config.harvest_config["dtype"] == "bfloat16"
    rho = torch.tensor(json.loads((tmp_path / "deltas" / "harvest.json").read_text())["statistics"]["log_rho"]["mean"])
    assert model.config.log_rho_mean == pytest.approx(float(rho), abs=0.1)
    assert history(tmp_path / "model")["num_train_deltas"] == 18


def test_two_process_ddp_run_writes_one_model(tmp_path):
    script = Path(__file__).parent / "scripts" / "train_ddp.py"
    # `accelerate launch --cpu --num_processes 2` starts a single process without mpirun; torchrun-style
    # launching (--multi_gpu) with ACCELERATE_USE_CPU gives two gloo processes on CPU.
    env = subprocess_env(OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", str(script), str(tmp_path)]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert [p.name for p in tmp_path.glob("*.safetensors")] == ["model.safetensors"]
    assert {"config.json", HISTORY_NAME} <= {p.name for p in tmp_path.iterdir()}
    checkpoint = tmp_path / CHECKPOINTS_DIR / "checkpoint-4"
    assert sorted(p.name for p in checkpoint.glob("noise_generator_*")) == [
        "noise_generator_0.safetensors", "noise_generator_1.safetensors"
    ]
    log = history(tmp_path)
    assert log["num_processes"] == 2 and log["global_step"] == 4
    assert log["total_batch_size"] == 16
    loaded = OCDWrapper.from_pretrained(tmp_path, backbone=tiny_bert())
    inputs = {"input_ids": torch.randint(1, 50, (2, 6)), "attention_mask": torch.ones(2, 6, dtype=torch.long)}
    generated = loaded.generate_deltas(loaded.conditioning(**inputs), num_inference_steps=2)
    assert torch.isfinite(generated).all()


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda ds, meta: (ds.select([]), meta), "empty"),
        (lambda ds, meta: (ds.remove_columns(["layer_input"]), meta), "layer_input"),
        (lambda ds, meta: (ds, {k: v for k, v in meta.items() if k != "out_features"}), "out_features"),
        (lambda ds, meta: (ds, {**meta, "in_features": 12, "target_module": "classifier"}), r"deltas have shape \(3, 16\)"),
    ],
    ids=["empty", "missing-column", "missing-metadata", "shape-vs-metadata"],
)
def test_bad_delta_datasets_are_refused(backbone, deltas, tmp_path, corrupt, message):
    with pytest.raises(ValueError, match=message):
        train_hypernetwork(corrupt(*deltas), backbone, tmp_path, config_overrides=TINY_OVERRIDES, num_steps=1, **QUIET)


def test_deltas_from_another_layer_shape_are_refused(deltas, tmp_path):
    other = tiny_bert(num_labels=5)
    with pytest.raises(ValueError, match=r"harvested from a layer of weight shape \(3, 16\)"):
        train_hypernetwork(deltas, other, tmp_path, config_overrides=TINY_OVERRIDES, num_steps=1, **QUIET)


def test_invalid_arguments_are_refused(backbone, deltas, tmp_path):
    with pytest.raises(ValueError, match="scale_loss"):
        train_hypernetwork(deltas, backbone, tmp_path, scale_loss="l1", **QUIET)
    with pytest.raises(ValueError, match="not both"):
        train_hypernetwork(deltas, backbone, tmp_path, num_steps=1, num_epochs=1, **QUIET)
    with pytest.raises(ValueError, match="config_overrides may only set"):
        train_hypernetwork(deltas, backbone, tmp_path, config_overrides={"in_features": 4}, num_steps=1, **QUIET)
    with pytest.raises(ValueError, match="not a checkpoint"):
        train_hypernetwork(deltas, backbone, tmp_path, config_overrides=TINY_OVERRIDES, num_steps=1,
                           resume_from_checkpoint=tmp_path / "nowhere", **QUIET)
    with pytest.raises(TypeError, match="deltas must be"):
        train_hypernetwork(deltas[0], backbone, tmp_path, num_steps=1, **QUIET)


def test_auto_delta_mode_factorises_exact_head_deltas_and_keeps_per_token_layers_full(backbone, deltas):
    dataset, metadata = deltas
    assert build_config(metadata, {}, dataset).delta_mode == "factorised"
    assert build_config(metadata, {}, dataset).factor_rule == "sign"
    per_token = harvest_tiny(backbone, num_samples=8, target="intermediate.dense")
    assert build_config(per_token[1], {}, per_token[0]).delta_mode == "full"
    sgd_metadata = {**metadata, "harvest_config": {**metadata["harvest_config"], "optimizer": "sgd"}}
    assert build_config(sgd_metadata, {}, dataset).delta_mode == "full"  # Adam deltas are not u xᵀ
    assert build_config(metadata, {"delta_mode": "full"}, dataset).delta_mode == "full"


def test_report_to_tensorboard_writes_the_logged_losses(backbone, deltas, tmp_path):
    train_hypernetwork(
        deltas, backbone, tmp_path, config_overrides=TINY_OVERRIDES, num_steps=4, batch_size=16, logging_steps=2,
        validation_fraction=0.25, report_to=["tensorboard"], **QUIET,
    )
    event_files = sorted(tmp_path.rglob("events.out.tfevents.*"))
    assert event_files and all(tmp_path in path.parents for path in event_files)
    logged = {entry["step"]: entry for entry in history(tmp_path)["log_history"]}
    scalars = {}
    for directory in {path.parent for path in event_files}:
        events = EventAccumulator(str(directory))
        events.Reload()
        for tag in events.Tags()["scalars"]:
            scalars[tag] = {event.step: event.value for event in events.Scalars(tag)}
    assert set(scalars) == {"denoise_loss", "scale_loss", "val_denoise_loss", "val_scale_loss", "learning_rate", "epoch"}
    for tag in scalars:
        assert set(scalars[tag]) == {2, 4}, tag
        for step, value in scalars[tag].items():
            assert value == pytest.approx(logged[step][tag], rel=1e-6), (tag, step)
    hparams = "".join(path.read_text() for path in tmp_path.rglob("hparams.yml"))
    assert "delta_mode: full" in hparams and "scheduler_class: DDIMScheduler" in hparams and "num_steps: 4" in hparams


def test_a_tracker_that_is_not_installed_is_refused_not_dropped(backbone, deltas, tmp_path, monkeypatch):
    monkeypatch.setattr("ocd_hf.trainer.get_available_trackers", lambda: [])
    with pytest.raises(ValueError, match=r"\['tensorboard'\], not installed here \(pip install tensorboard\)"):
        train_hypernetwork(deltas, backbone, tmp_path, config_overrides=TINY_OVERRIDES, num_steps=1, report_to=["tensorboard"], **QUIET)
    assert OCDTrainingArguments(report_to="tensorboard").report_to == ["tensorboard"]  # transformers accepts a string too
    assert OCDTrainingArguments(report_to=["none"]).report_to == []


def test_the_sampling_scheduler_is_a_training_override(backbone, deltas, tmp_path):
    dataset, metadata = deltas
    assert build_config(metadata, {"scheduler_class": "EulerDiscreteScheduler"}, dataset).scheduler_class == "EulerDiscreteScheduler"
    assert build_config(metadata, {}, dataset).scheduler_class == "DDIMScheduler"
    with pytest.raises(ValueError, match="Unknown scheduler_class"):
        build_config(metadata, {"scheduler_class": "DIMScheduler"}, dataset)
    model = train_hypernetwork(
        deltas, backbone, tmp_path, config_overrides={**TINY_OVERRIDES, "scheduler_class": "DPMSolverMultistepScheduler", "num_inference_steps": 2},
        num_steps=2, batch_size=16, validation_fraction=0.0, **QUIET,
    )
    loaded = OCDWrapper.from_pretrained(tmp_path, backbone=backbone)
    assert loaded.config.scheduler_class == model.config.scheduler_class == "DPMSolverMultistepScheduler"
    inputs = {"input_ids": torch.randint(1, 50, (2, 6)), "attention_mask": torch.ones(2, 6, dtype=torch.long)}
    generated = loaded.generate_deltas(loaded.conditioning(**inputs), num_samples=2, generator=torch.Generator().manual_seed(0))
    assert generated.shape == (2, 2, 3, 16) and torch.isfinite(generated).all()

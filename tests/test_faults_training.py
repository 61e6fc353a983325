"""Faults during training: a run killed at any instant (inside a step, inside a checkpoint save, while
pruning, while saving the final model, or by a real SIGKILL) resumes from ``"latest"`` to the weights of
an uninterrupted run, also with ``checkpoints_total_limit=1``; incomplete checkpoints are skipped with a
warning naming them; settings changed on resume are refused by name; the best weights by validation loss
are the ones saved. Mc-Di (REPTILE and single-level) and OCD share the substrate under test."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from conftest import tiny_bert
from helpers import subprocess_env
from helpers.mcdi import harvest_tiny_heads
from test_training import QUIET as OCD_QUIET
from test_training import TINY_OVERRIDES, harvest_tiny

from ocd_hf import trainer as trainer_module
from ocd_hf.methods.mcdi import McDiHeadGenerator, ReptileTrainer, train_head_generator
from ocd_hf.methods.mcdi import training as mcdi_training
from ocd_hf.methods.ocd.training import train_hypernetwork
from ocd_hf.trainer import CHECKPOINTS_DIR, HISTORY_NAME, TRAINING_STATE_NAME, list_checkpoints

TINY = {"denoiser_config": {"hidden_size": 32, "num_layers": 1, "num_heads": 4, "intermediate_size": 64}}
SETTINGS = dict(config_overrides=TINY, num_steps=6, checkpointing_steps=2, batch_size=4, meta_batch_size=4, validation_fraction=0.25,
                ema_decay=0.99, meta_optimizer="adam", seed=3, progress=False, logging_steps=2)


class Killed(Exception):
    """Stands for the process dying at the injected point."""


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    """24 tasks, 3-way 1-shot, d = 6, three local targets each."""
    directory = tmp_path_factory.mktemp("heads")
    harvest_tiny_heads(directory)
    return directory


@pytest.fixture(scope="module")
def uninterrupted(heads, tmp_path_factory):
    """The final weights and history of uninterrupted runs, by ``reptile``."""
    results = {}
    for reptile in (True, False):
        directory = tmp_path_factory.mktemp(f"full-{reptile}")
        model = train_head_generator(heads, directory, reptile=reptile, **SETTINGS)
        results[reptile] = (state_of(model), json.loads((directory / HISTORY_NAME).read_text())["log_history"])
    return results


def state_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def kill_on_call(monkeypatch, owners, name: str, call: int, after: bool = False) -> None:
    """Make ``owner.name`` raise :class:`Killed` on its ``call``-th call (counted over all ``owners``), before
    running or (``after``) after running the original. ``owners`` that lack ``name`` are skipped."""
    calls = []
    for owner in owners:
        original = getattr(owner, name, None)
        if original is None:
            continue

        def killed(*args, _original=original, **kwargs):
            calls.append(1)
            if len(calls) == call and not after:
                raise Killed(name)
            result = _original(*args, **kwargs)
            if len(calls) == call:
                raise Killed(name)
            return result

        monkeypatch.setattr(owner, name, killed)


def step_owner(reptile: bool):
    return (ReptileTrainer, "meta_step") if reptile else (trainer_module.GeneratorTrainer, "training_step")


# name -> (owners, attribute, call, after): the kill points of one 6-step run checkpointing at steps 2, 4 and 6.
KILL_POINTS = {
    "inside-step-5": (None, None, 5, False),
    "inside-save-state-of-checkpoint-4": ((Accelerator,), "save_state", 2, True),
    "writing-loop-state-of-checkpoint-4": ((trainer_module, mcdi_training), "save_loop_state", 2, False),
    "pruning-after-checkpoint-4": ((trainer_module, mcdi_training), "prune_checkpoints", 2, False),
    "saving-the-final-model": ((McDiHeadGenerator,), "save_files", 1, False),
}


# (reptile, kill point, checkpoints_total_limit): both trainers where a checkpoint is being written (with and without a
# limit); elsewhere one case each keeps the suite fast (tests/test_mcdi_training.py kills both inside a step too).
KILL_CASES = [
    (True, "inside-step-5", None),
    (True, "saving-the-final-model", None),
    (True, "pruning-after-checkpoint-4", 1),
    *[(reptile, point, limit) for reptile in (True, False)
      for point in ("inside-save-state-of-checkpoint-4", "writing-loop-state-of-checkpoint-4") for limit in (None, 1)],
]


@pytest.mark.parametrize(
    "reptile, point, limit", KILL_CASES,
    ids=[f"{'reptile' if reptile else 'single-level'}-{point}-{'limit-1' if limit else 'keep-all'}" for reptile, point, limit in KILL_CASES],
)
def test_a_run_killed_anywhere_resumes_to_the_uninterrupted_weights(heads, uninterrupted, tmp_path, monkeypatch, reptile, point, limit):
    owners, name, call, after = KILL_POINTS[point]
    if owners is None:
        owner, name = step_owner(reptile)
        owners = (owner,)
    settings = {**SETTINGS, "reptile": reptile, "checkpoints_total_limit": limit}
    with monkeypatch.context() as patch:
        kill_on_call(patch, owners, name, call, after)
        with pytest.raises(Killed):
            train_head_generator(heads, tmp_path, **settings)
    resumed = train_head_generator(heads, tmp_path, resume_from_checkpoint="latest", **settings)
    expected, log = uninterrupted[reptile]
    for key, tensor in state_of(resumed).items():
        torch.testing.assert_close(tensor, expected[key], msg=key)  # float32 tolerances
    assert json.loads((tmp_path / HISTORY_NAME).read_text())["log_history"] == log
    kept = [checkpoint.name for checkpoint in list_checkpoints(tmp_path)]
    assert kept == (["checkpoint-6"] if limit == 1 else ["checkpoint-2", "checkpoint-4", "checkpoint-6"])


def test_resuming_from_an_older_checkpoint_replaces_the_newer_ones(heads, uninterrupted, tmp_path):
    settings = {**SETTINGS, "reptile": False}
    train_head_generator(heads, tmp_path, **settings)
    older = tmp_path / CHECKPOINTS_DIR / "checkpoint-2"
    resumed = train_head_generator(heads, tmp_path, resume_from_checkpoint=older, **settings)
    expected, log = uninterrupted[False]
    for key, tensor in state_of(resumed).items():
        torch.testing.assert_close(tensor, expected[key], msg=key)
    assert sorted(os.listdir(tmp_path / CHECKPOINTS_DIR)) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]  # no partial left


def test_a_sigkilled_save_resumes_to_the_uninterrupted_weights(heads, uninterrupted, tmp_path):
    # A real SIGKILL while checkpoint-4 is being written (after Accelerate's files, before the loop state), limit 1.
    script = Path(__file__).parent / "scripts" / "train_killed.py"
    settings = {**SETTINGS, "reptile": True, "checkpoints_total_limit": 1}
    completed = subprocess.run([sys.executable, str(script), str(heads), str(tmp_path), json.dumps(settings)],
                               env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert completed.returncode == -signal.SIGKILL, completed.stderr[-3000:]
    resumed = train_head_generator(heads, tmp_path, resume_from_checkpoint="latest", **settings)
    expected, log = uninterrupted[True]
    for key, tensor in state_of(resumed).items():
        torch.testing.assert_close(tensor, expected[key], msg=key)
    assert json.loads((tmp_path / HISTORY_NAME).read_text())["log_history"] == log


def test_latest_skips_incomplete_checkpoints_with_a_warning_naming_them(heads, uninterrupted, tmp_path, library_logs):
    settings = {**SETTINGS, "reptile": False, "num_steps": 2}
    train_head_generator(heads, tmp_path, **settings)
    # What a process killed by an older version left: an empty checkpoint and one without the loop state.
    (tmp_path / CHECKPOINTS_DIR / "checkpoint-12").mkdir()
    partial = tmp_path / CHECKPOINTS_DIR / "checkpoint-4"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"")
    with library_logs.at_level(logging.WARNING):
        resumed = train_head_generator(heads, tmp_path, resume_from_checkpoint="latest", **{**settings, "num_steps": 6})
    warned = " ".join(record.getMessage() for record in library_logs.records if record.levelno >= logging.WARNING)
    assert "checkpoint-12" in warned and "checkpoint-4" in warned and "incomplete" in warned
    expected, _ = uninterrupted[False]
    for key, tensor in state_of(resumed).items():
        torch.testing.assert_close(tensor, expected[key], msg=key)


def test_ocd_checkpoint_killed_inside_the_save_with_limit_1_keeps_the_previous_one(tmp_path, monkeypatch):
    backbone = tiny_bert()
    deltas = harvest_tiny(backbone, num_samples=32)
    settings = dict(config_overrides=TINY_OVERRIDES, num_steps=6, batch_size=8, checkpointing_steps=2, checkpoints_total_limit=1,
                    logging_steps=2, seed=1, **OCD_QUIET)
    expected = state_of(train_hypernetwork(deltas, backbone, tmp_path / "full", **settings).hypernetwork)
    with monkeypatch.context() as patch:
        kill_on_call(patch, (Accelerator,), "save_state", 2, after=True)
        with pytest.raises(Killed):
            train_hypernetwork(deltas, backbone, tmp_path / "killed", **settings)
    assert [c.name for c in list_checkpoints(tmp_path / "killed")] == ["checkpoint-2"]
    resumed = train_hypernetwork(deltas, backbone, tmp_path / "killed", resume_from_checkpoint="latest", **settings)
    for key, tensor in state_of(resumed.hypernetwork).items():
        torch.testing.assert_close(tensor, expected[key], msg=key)


# ----- settings on resume -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, message",
    [
        ({"learning_rate": 1e-2}, r"learning_rate=0.01 \(the checkpoint has 0.0001\)"),
        ({"seed": 4}, "seed"),
        ({"ema_decay": 0.9}, "ema_decay"),
        ({"batch_size": 8}, "batch_size"),
    ],
    ids=["learning_rate", "seed", "ema_decay", "batch_size"],
)
def test_a_changed_setting_on_resume_is_refused_by_name(heads, tmp_path, change, message):
    settings = {**SETTINGS, "reptile": False, "num_steps": 2}
    train_head_generator(heads, tmp_path, **settings)
    with pytest.raises(ValueError, match=message):
        train_head_generator(heads, tmp_path, resume_from_checkpoint="latest", **{**settings, "num_steps": 4, **change})


def test_resuming_with_another_generator_architecture_is_a_clear_error(heads, tmp_path):
    settings = {**SETTINGS, "reptile": True, "num_steps": 2}
    train_head_generator(heads, tmp_path, **settings)
    wider = {"denoiser_config": {**TINY["denoiser_config"], "hidden_size": 16}}
    with pytest.raises(ValueError, match=r"another generator.*hidden_size|another generator"):
        train_head_generator(heads, tmp_path, resume_from_checkpoint="latest", **{**settings, "num_steps": 4, "config_overrides": wider})


def test_resuming_on_another_dataset_size_is_a_clear_error(heads, tmp_path):
    from ocd_hf.task_heads import load_head_metadata, load_task_heads

    settings = {**SETTINGS, "reptile": False, "num_steps": 2}
    train_head_generator(heads, tmp_path, **settings)
    fewer = (load_task_heads(heads).select(range(20)), load_head_metadata(heads))
    with pytest.raises(ValueError, match=r"num_train_items: 18 in the checkpoint, 15 now"):
        train_head_generator(fewer, tmp_path, resume_from_checkpoint="latest", **{**settings, "num_steps": 4})


def test_ocd_resuming_with_another_generator_type_is_a_clear_error(tmp_path):
    backbone = tiny_bert()
    deltas = harvest_tiny(backbone, num_samples=16)
    settings = dict(num_steps=2, batch_size=8, checkpointing_steps=2, **OCD_QUIET)
    train_hypernetwork(deltas, backbone, tmp_path, config_overrides=TINY_OVERRIDES, **settings)
    with pytest.raises(ValueError, match="generator_type"):
        train_hypernetwork(deltas, backbone, tmp_path, config_overrides={**TINY_OVERRIDES, "generator_type": "regression"},
                           resume_from_checkpoint="latest", **{**settings, "num_steps": 4})


# ----- the best weights ---------------------------------------------------------------------------------


def test_the_best_weights_by_validation_loss_are_saved_and_named(heads, tmp_path, monkeypatch):
    # A validation loss that is best at step 6 of 8: the saved generator holds the weights of step 6 (no EMA).
    values = iter([3.0, 2.0, 1.0, 5.0])

    def scripted_validation(self):
        return {"val_denoise_loss": next(values)}

    settings = {**SETTINGS, "reptile": False, "num_steps": 8, "ema_decay": None, "checkpointing_steps": None, "validation_steps": 2}
    captured = {}
    original_step = trainer_module.GeneratorTrainer.after_optimizer_step

    def capture(self, bar):
        original_step(self, bar)
        captured[self.state.global_step] = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    monkeypatch.setattr(trainer_module.GeneratorTrainer, "validate", scripted_validation)
    monkeypatch.setattr(trainer_module.GeneratorTrainer, "after_optimizer_step", capture)
    model = train_head_generator(heads, tmp_path, **settings)
    history = json.loads((tmp_path / HISTORY_NAME).read_text())
    assert history["saved_step"] == 6 and history["best_val_loss"] == 1.0 and history["global_step"] == 8
    for key, tensor in model.denoiser.state_dict().items():
        torch.testing.assert_close(tensor, captured[6][key], rtol=0, atol=0, msg=key)
    assert any(not torch.equal(captured[6][key], captured[8][key]) for key in captured[6])  # the last weights differ
    loaded = McDiHeadGenerator.from_pretrained(tmp_path)
    for key, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], tensor, rtol=0, atol=0)


def test_the_last_weights_are_kept_when_asked(heads, tmp_path):
    settings = {**SETTINGS, "reptile": False, "num_steps": 4, "checkpointing_steps": None, "load_best_model_at_end": False}
    train_head_generator(heads, tmp_path, **settings)
    assert json.loads((tmp_path / HISTORY_NAME).read_text())["saved_step"] == 4


def test_checkpoints_record_the_settings_and_leave_no_partial_directory(heads, tmp_path):
    train_head_generator(heads, tmp_path, **{**SETTINGS, "reptile": False, "num_steps": 4})
    state = json.loads((tmp_path / CHECKPOINTS_DIR / "checkpoint-4" / TRAINING_STATE_NAME).read_text())
    assert state["settings"]["arguments"]["learning_rate"] == 1e-4 and state["settings"]["arguments"]["seed"] == 3
    assert sorted(os.listdir(tmp_path / CHECKPOINTS_DIR)) == ["checkpoint-2", "checkpoint-4"]

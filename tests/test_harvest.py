"""Harvest: vectorised deltas equal a per-sample loop; resume after SIGKILL; 2 processes = 1 process."""

from __future__ import annotations

import copy
import logging
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Array3D, Dataset, DatasetDict, Features, Image, Value
from helpers import subprocess_env
from helpers.harvest_fixtures import CASES, build_backbone, build_dataset
from helpers.tolerances import adam_delta_atol
from torch.nn import functional as F

from ocd_hf.data import fixed_shape_numpy
from ocd_hf.methods.ocd.deltas import load_deltas, load_harvest_metadata, materialise_deltas, shard_path
from ocd_hf.methods.ocd.harvest import harvest_deltas, harvest_from_pretrained, rank1_energy
from ocd_hf.target import capture_conditioning, find_target_linear

SCRIPTS = Path(__file__).parent / "scripts"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO_ROOT = Path(__file__).resolve().parents[1]


def per_sample_reference(backbone, target, dataset: Dataset, task: str, lr: float = 5e-4, steps: int = 3):
    """The official OCD procedure: a fresh copy of the model per sample, Adam on the layer weight, batch size 1."""
    rows = dataset.with_format("torch")
    results = []
    for index in range(len(dataset)):
        row = rows[index : index + 1]
        label = row.pop("label")
        model = copy.deepcopy(backbone).eval()
        _, layer = find_target_linear(model, target)
        with torch.no_grad():
            cond = capture_conditioning(model, layer, row)
        start = layer.weight.detach().clone()
        opt = torch.optim.Adam([layer.weight], lr=lr)
        losses = []
        for _ in range(steps + 1):
            output = model(**row).logits
            if task == "classification":
                loss = F.cross_entropy(output, label)
            else:
                loss = F.mse_loss(output.reshape(-1), label.reshape(-1).float())
            losses.append(loss.item())
            if len(losses) > steps:
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
        results.append(
            {
                "delta": layer.weight.detach() - start,
                "loss_before": losses[0],
                "loss_after": losses[-1],
                "layer_input": cond.layer_input[0],
                "layer_output": cond.layer_output[0],
                "model_output": cond.model_output[0],
                "label": label[0],
            }
        )
    return results


@pytest.mark.parametrize("case", sorted(CASES))
def test_vectorised_harvest_equals_per_sample_loop(case, tmp_path):
    kind, target = CASES[case]
    backbone = build_backbone(kind)
    dataset = build_dataset(kind, 5)
    deltas = harvest_deltas(backbone, dataset, target, tmp_path, batch_size=2, shard_size=3, delta_storage="full", progress=False)
    task = "regression" if kind == "mlp" else "classification"
    reference = per_sample_reference(backbone, target, dataset, task)

    assert len(deltas) == 5
    rows = deltas[:]
    assert rows["id"].tolist() == list(range(5))
    expected = torch.stack([r["delta"] for r in reference])
    assert rows["delta"].shape == expected.shape
    assert expected.abs().amax() > 0
    _, layer = find_target_linear(backbone, target)
    tokens = len(dataset[0]["input_ids"]) if "input_ids" in dataset.column_names else 1
    atol = adam_delta_atol(lr=5e-4, steps=3, reduction_length=layer.in_features * tokens)
    torch.testing.assert_close(rows["delta"], expected, rtol=0, atol=atol)
    for column in ("loss_before", "loss_after"):
        torch.testing.assert_close(rows[column], torch.tensor([r[column] for r in reference]), rtol=1e-5, atol=1e-6)
    assert (rows["loss_after"] < rows["loss_before"]).all(), "fine-tuning on the sample must lower its loss"
    for column in ("layer_input", "layer_output", "model_output"):
        torch.testing.assert_close(rows[column], torch.stack([r[column] for r in reference]), rtol=1e-5, atol=1e-6)
    assert torch.equal(rows["label"], torch.stack([r["label"] for r in reference]).to(rows["label"].dtype))
    torch.testing.assert_close(rows["rho"], expected.pow(2).mean((1, 2)).sqrt(), rtol=1e-5, atol=0)
    singular = np.linalg.svd(rows["delta"].double().numpy(), compute_uv=False)
    np.testing.assert_allclose(rows["rank1_energy"].numpy(), singular[:, 0] ** 2 / (singular**2).sum(1), rtol=1e-5)


def test_rank1_energy_is_batched_and_exact_on_known_matrices(monkeypatch):
    u, v = torch.randn(4, 1), torch.randn(1, 6)
    diagonal = torch.zeros(4, 6)
    diagonal[0, 0], diagonal[1, 1] = 3.0, 1.0
    batch = torch.stack([u @ v, torch.eye(4, 6), torch.zeros(4, 6), diagonal, torch.randn(4, 6)])
    energy = rank1_energy(batch)
    assert energy.shape == (5,) and energy.dtype == torch.float32
    assert energy[0].item() == pytest.approx(1.0, abs=1e-6)
    assert energy[1].item() == pytest.approx(0.25, abs=1e-6)
    assert energy[2].item() == 1.0  # an all-zero delta is trivially rank-1
    assert energy[3].item() == pytest.approx(0.9, abs=1e-6)
    singular = np.linalg.svd(batch[4].double().numpy(), compute_uv=False)
    assert energy[4].item() == pytest.approx(singular[0] ** 2 / (singular**2).sum(), rel=1e-6)
    torch.testing.assert_close(rank1_energy(batch.transpose(1, 2)), energy, rtol=1e-6, atol=1e-7)  # the other Gram side

    def no_convergence(*args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.eigh: failed to converge")

    monkeypatch.setattr(torch.linalg, "eigvalsh", no_convergence)
    torch.testing.assert_close(rank1_energy(batch), energy, rtol=1e-6, atol=1e-7)


def test_trajectory_ends_at_the_delta(tmp_path):
    kind, target = CASES["deit-classifier"]
    deltas = harvest_deltas(
        build_backbone(kind), build_dataset(kind, 3), target, tmp_path, steps=2, store_trajectory=True, delta_storage="full",
        progress=False,
    )
    rows = deltas[:]
    assert rows["trajectory"].shape == (3, 2, 3, 16)
    assert torch.equal(rows["trajectory"][:, -1], rows["delta"])
    assert not torch.equal(rows["trajectory"][:, 0], rows["delta"])


@pytest.mark.parametrize("storage", ["full", "factorised"])
def test_non_finite_deltas_are_skipped_warned_and_counted(tmp_path, storage, library_logs):
    kind, target = CASES["mlp-regression"]
    dataset = build_dataset(kind, 6)
    labels = dataset["label"][:]
    labels[2] = labels[3] = float("nan")  # the whole second shard
    dataset = dataset.remove_columns("label").add_column("label", labels)
    with library_logs.at_level(logging.WARNING, logger="ocd_hf"):
        deltas = harvest_deltas(
            build_backbone(kind), dataset, target, tmp_path, batch_size=4, shard_size=2, delta_storage=storage, progress=False
        )
    assert re.search(r"Skipped 2 sample.*\[2, 3\]", library_logs.text)
    assert deltas[:]["id"].tolist() == [0, 1, 4, 5]
    assert torch.isfinite(materialise_deltas(deltas[:], load_harvest_metadata(tmp_path))).all()
    assert len(Dataset.from_file(str(shard_path(tmp_path, 1, 3)))) == 0, "an all-skipped shard is an empty, valid file"
    metadata = load_harvest_metadata(tmp_path)
    assert metadata["num_skipped_non_finite"] == 2
    assert metadata["skipped_ids"] == [2, 3]
    assert metadata["num_samples"] == 4


def test_append_with_other_backbone_layer_or_settings_is_refused(tmp_path):
    kind, target = CASES["bert-classifier"]
    dataset = build_dataset(kind, 4)
    harvest_deltas(build_backbone(kind), dataset, target, tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"harvest_config\.lr \(directory: 0\.0005, this call: 0\.001\)"):
        harvest_deltas(build_backbone(kind), dataset, target, tmp_path, lr=1e-3, progress=False)
    with pytest.raises(ValueError, match=r"base_layer_fingerprint"):
        harvest_deltas(build_backbone(kind, seed=1), dataset, target, tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"target_module \(directory: 'classifier', this call: 'bert.pooler.dense'\)"):
        harvest_deltas(build_backbone(kind), dataset, "pooler.dense", tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"source\.num_rows"):
        harvest_deltas(build_backbone(kind), build_dataset(kind, 5), target, tmp_path, progress=False)
    # The same call is accepted (nothing left to do) and returns the same dataset.
    assert len(harvest_deltas(build_backbone(kind), dataset, target, tmp_path, progress=False)) == 4


def test_resume_after_sigkill_continues_from_last_complete_shard(tmp_path):
    kind, target = CASES["bert-intermediate"]
    out = tmp_path / "killed"
    command = [sys.executable, str(SCRIPTS / "harvest_worker.py"), "--case", "bert-intermediate", "--output-dir", str(out),
               "--num-samples", "10", "--batch-size", "2", "--shard-size", "3", "--die-after-shards", "2"]
    killed = subprocess.run(command, capture_output=True, text=True, timeout=300, env=subprocess_env())
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    done = sorted(p.name for p in (out / "data").glob("train-*.arrow"))
    assert done == ["train-00000-of-00004.arrow", "train-00001-of-00004.arrow"]
    assert list((out / "data").glob(".*.tmp")), "the shard being written when killed must be a temporary file"
    assert load_harvest_metadata(out)["complete"] is False
    with pytest.raises(ValueError, match="not complete"):
        load_deltas(out)
    first_shard = shard_path(out, 0, 4).stat()

    resumed = harvest_deltas(build_backbone(kind), build_dataset(kind, 10), target, out, batch_size=2, shard_size=3, progress=False)
    assert shard_path(out, 0, 4).stat().st_mtime_ns == first_shard.st_mtime_ns, "complete shards are not redone"
    assert not list((out / "data").glob(".*.tmp"))
    assert resumed[:]["id"].tolist() == list(range(10))
    uninterrupted = harvest_deltas(
        build_backbone(kind), build_dataset(kind, 10), target, tmp_path / "whole", batch_size=2, shard_size=3, progress=False
    )
    torch.testing.assert_close(resumed[:]["delta"], uninterrupted[:]["delta"], rtol=0, atol=1e-9)
    assert load_harvest_metadata(out)["num_samples"] == 10


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_harvest_the_same_dataset_as_one(tmp_path):
    kind, target = CASES["bert-intermediate"]
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [str(accelerate), "launch", "--cpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "--main_process_port", str(_free_port()), str(SCRIPTS / "harvest_worker.py"),
               "--case", "bert-intermediate", "--output-dir", str(tmp_path / "two"), "--num-samples", "10",
               "--batch-size", "2", "--shard-size", "3", "--use-accelerator"]
    env = subprocess_env(OMP_NUM_THREADS="1")
    launched = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=REPO_ROOT)
    assert launched.returncode == 0, launched.stderr[-3000:]
    two = load_deltas(tmp_path / "two")
    one = harvest_deltas(build_backbone(kind), build_dataset(kind, 10), target, tmp_path / "one", batch_size=2, shard_size=3, progress=False)
    assert two[:]["id"].tolist() == one[:]["id"].tolist() == list(range(10))
    for column in ("delta", "layer_input", "model_output", "loss_after"):
        torch.testing.assert_close(two[:][column], one[:][column], rtol=1e-6, atol=1e-9)
    meta_one, meta_two = load_harvest_metadata(tmp_path / "one"), load_harvest_metadata(tmp_path / "two")
    assert meta_two["num_samples"] == meta_one["num_samples"] == 10
    assert meta_two["base_layer_fingerprint"] == meta_one["base_layer_fingerprint"]


def test_collate_fn_on_raw_text_matches_pretokenized_columns(tmp_path):
    kind, target = CASES["bert-classifier"]
    tokenized = build_dataset(kind, 4)
    texts = [" ".join(str(token) for token in ids) for ids in tokenized["input_ids"][:]]
    raw = Dataset.from_dict({"text": texts, "label": tokenized["label"][:], "attention_mask": tokenized["attention_mask"][:]})

    def collate(batch):
        ids = torch.tensor([[int(token) for token in text.split()] for text in batch["text"]])
        return {"input_ids": ids, "attention_mask": torch.tensor(batch["attention_mask"]), "labels": torch.tensor(batch["label"])}

    from_text = harvest_deltas(build_backbone(kind), raw, target, tmp_path / "text", collate_fn=collate, progress=False)
    from_columns = harvest_deltas(build_backbone(kind), tokenized, target, tmp_path / "ids", progress=False)
    torch.testing.assert_close(from_text[:]["delta_factor"], from_columns[:]["delta_factor"], rtol=0, atol=0)


def test_fixed_shape_nested_lists_read_straight_from_arrow_equal_the_numpy_formatter():
    generator = np.random.default_rng(0)
    dataset = Dataset.from_dict({
        "pixel_values": generator.standard_normal((12, 1, 4, 3)), "input_ids": np.arange(24, dtype=np.int32).reshape(12, 2),
        "flag": [True, False] * 6, "text": ["a"] * 12, "ragged": [[1], [1, 2]] * 6, "holes": [[1.0, None]] * 12,
    })
    rows = dataset.shuffle(seed=0).select(range(2, 10))  # an indices mapping, as after .shuffle/.select
    table, formatted = rows.with_format("arrow")[1:6], rows.with_format("numpy")[1:6]
    for name in ("pixel_values", "input_ids", "flag"):
        values = fixed_shape_numpy(table.column(name))
        assert values.dtype == formatted[name].dtype and np.array_equal(values, formatted[name]), name
    for name in ("text", "ragged", "holes"):  # left to the numpy formatter (and its errors)
        assert fixed_shape_numpy(table.column(name)) is None, name
    as_array = dataset.cast_column("pixel_values", Array3D((1, 4, 3), "float32"))
    assert fixed_shape_numpy(as_array.with_format("arrow")[0:2].column("pixel_values")) is None


def test_bad_inputs_get_clear_errors(tmp_path):
    kind, target = CASES["bert-classifier"]
    backbone, dataset = build_backbone(kind), build_dataset(kind, 4)
    with pytest.raises(ValueError, match="label_column 'target' is not a column"):
        harvest_deltas(backbone, dataset, target, tmp_path / "a", label_column="target", progress=False)
    untokenized = dataset.rename_columns({"input_ids": "tokens", "attention_mask": "mask"})
    with pytest.raises(ValueError, match="None of the dataset columns .* is an input .*collate_fn"):
        harvest_deltas(backbone, untokenized, target, tmp_path / "b", progress=False)
    with pytest.raises(ValueError, match=r"failed on the first batch, built from inputs \['attention_mask'\].*input_columns="):
        harvest_deltas(backbone, dataset.rename_column("input_ids", "tokens"), target, tmp_path / "b", progress=False)
    ragged = Dataset.from_dict({"input_ids": [[1, 2, 3], [1, 2]], "label": [0, 1]})
    with pytest.raises(ValueError, match=r"different lengths.*DataCollatorWithPadding"):
        harvest_deltas(backbone, ragged, target, tmp_path / "c", progress=False)
    fractional = dataset.cast_column("label", dataset.features["label"].__class__("float32")).map(lambda row: {"label": row["label"] + 0.5})
    with pytest.raises(ValueError, match=r"fractional class labels in 4 row\(s\).*class labels must be integers"):
        harvest_deltas(backbone, fractional, target, tmp_path / "d", progress=False)
    with pytest.raises(TypeError, match="must be a datasets.Dataset"):
        harvest_deltas(backbone, dataset.to_iterable_dataset(), target, tmp_path / "e", progress=False)
    with pytest.raises(ValueError, match="dtype must be one of"):
        harvest_deltas(backbone, dataset, target, tmp_path / "f", dtype="float16", progress=False)
    with pytest.raises(ValueError, match="matches no module"):
        harvest_deltas(backbone, dataset, "no_such_layer", tmp_path / "g", progress=False)


def test_harvest_from_pretrained_tokenizes_text_from_local_dirs(tmp_path):
    from transformers import BertTokenizerFast

    kind, target = CASES["bert-classifier"]
    model_dir = tmp_path / "model"
    build_backbone(kind).save_pretrained(model_dir)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *[f"w{i}" for i in range(45)]]) + "\n")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(model_dir)
    Dataset.from_dict({"text": ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9", "w10"], "label": [0, 1, 2, 1]}).save_to_disk(tmp_path / "data")

    deltas = harvest_from_pretrained(
        str(model_dir), str(tmp_path / "data"), target, tmp_path / "out", text_column="text", max_samples=3,
        delta_storage="full", progress=False,
    )
    metadata = load_harvest_metadata(tmp_path / "out")
    assert metadata["base_model_name_or_path"] == str(model_dir)
    assert metadata["base_model_class"] == "BertForSequenceClassification"
    assert metadata["num_samples"] == len(deltas) == 3
    assert metadata["harvest_config"]["delta_storage"] == "full"
    assert deltas[:]["label"].tolist() == [0, 1, 2]
    assert deltas[:]["delta"].abs().amax() > 0


def test_harvest_from_pretrained_processes_images(tmp_path):
    from transformers import DeiTImageProcessor

    kind, target = CASES["deit-classifier"]
    model_dir = tmp_path / "model"
    build_backbone(kind).save_pretrained(model_dir)
    DeiTImageProcessor(size={"height": 8, "width": 8}, crop_size={"height": 8, "width": 8}).save_pretrained(model_dir)
    from PIL import Image as PILImage

    pixels = np.random.default_rng(0).integers(0, 255, (3, 10, 10, 3), dtype=np.uint8)
    features = Features({"image": Image(), "label": Value("int64")})
    images = [PILImage.fromarray(array) for array in pixels]
    Dataset.from_dict({"image": images, "label": [0, 1, 2]}, features=features).save_to_disk(tmp_path / "data")

    deltas = harvest_from_pretrained(str(model_dir), str(tmp_path / "data"), target, tmp_path / "out", image_column="image", progress=False)
    assert len(deltas) == 3
    metadata = load_harvest_metadata(tmp_path / "out")
    assert metadata["harvest_config"]["delta_storage"] == "factorised"  # "auto" on a head
    assert materialise_deltas(deltas[:], metadata).shape == (3, 3, 16)
    DatasetDict({"train": Dataset.from_dict({"label": [0]})}).save_to_disk(tmp_path / "dict")
    with pytest.raises(ValueError, match=r"has no split 'test'; its splits are \['train'\]"):
        harvest_from_pretrained(str(model_dir), str(tmp_path / "dict"), target, tmp_path / "x", split="test", progress=False)

"""The ``ocd-hf`` command line end to end on a tiny local backbone: select-layer, harvest, train,
evaluate, push."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_DENOISER, text_batch, tiny_bert
from datasets import Dataset

from ocd_hf import OCDWrapper, load_deltas
from ocd_hf.cli import main


@pytest.fixture
def workspace(tmp_path):
    backbone = tiny_bert()
    backbone.save_pretrained(tmp_path / "backbone")
    batch = text_batch(batch=24, seed=3)
    rows = {key: value.tolist() for key, value in batch.items()}
    labels = torch.randint(0, 3, (24,), generator=torch.Generator().manual_seed(4)).tolist()
    Dataset.from_dict({**rows, "label": labels}).save_to_disk(str(tmp_path / "data"))
    return tmp_path


def test_pipeline_from_the_command_line(workspace, capsys, monkeypatch, loopback_hub):
    model, data = str(workspace / "backbone"), str(workspace / "data")
    main(["select-layer", "--model", model, "--dataset", data, "--num-draws", "4", "--num-samples", "8",
          "--candidates", "classifier", "intermediate.dense", "--output-dir", str(workspace / "selection")])
    ranking = json.loads((workspace / "selection" / "ranking.json").read_text())
    assert {row["name"] for row in ranking["rows"]} == {"classifier", "bert.encoder.layer.0.intermediate.dense"}

    main(["harvest", "--model", model, "--dataset", data, "--target-module", "classifier",
          "--output-dir", str(workspace / "deltas"), "--batch-size", "8", "--shard-size", "16"])
    assert "24 deltas" in capsys.readouterr().out
    assert len(load_deltas(workspace / "deltas")) == 24

    monkeypatch.setattr("ocd_hf.methods.ocd.configuration.DEFAULT_DENOISER_CONFIG", TINY_DENOISER)
    main(["train", "--model", model, "--deltas", str(workspace / "deltas"), "--output-dir", str(workspace / "ocd"),
          "--num-steps", "3", "--batch-size", "8", "--delta-mode", "full", "--num-inference-steps", "2"])
    ocd = OCDWrapper.from_pretrained(workspace / "ocd")
    assert ocd.config.delta_mode == "full" and ocd.config.num_inference_steps == 2
    assert ocd.config.base_model_name_or_path == model

    main(["evaluate", str(workspace / "ocd"), data, str(workspace / "eval"), "--deltas", str(workspace / "deltas"),
          "--seeds", "0", "--num-samples", "2", "--batch-size", "12"])
    table = capsys.readouterr().out
    for row in ("base", "ocd_1", "nearest_neighbour", "oracle"):
        assert row in table
    assert (workspace / "eval" / "results.json").is_file()

    main(["push", str(workspace / "ocd"), f"{loopback_hub.user}/ocd-cli", "--results", str(workspace / "eval" / "results.json")])
    assert "/commit/" in capsys.readouterr().out
    main(["push-deltas", str(workspace / "deltas"), f"{loopback_hub.user}/ocd-cli-deltas"])
    pulled = OCDWrapper.from_pretrained(f"{loopback_hub.user}/ocd-cli")
    for name, tensor in ocd.hypernetwork.state_dict().items():
        assert torch.equal(tensor, pulled.hypernetwork.state_dict()[name]), name


def test_cli_errors_are_reported_without_a_traceback(workspace, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["harvest", "--model", str(workspace / "backbone"), "--dataset", str(workspace / "data"),
              "--target-module", "no.such.layer", "--output-dir", str(workspace / "deltas")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "ocd-hf harvest: error:" in error and "matches no module" in error and "classifier" in error


def test_train_passes_the_scheduler_class_and_trackers(monkeypatch, tmp_path, capsys):
    calls = {}

    def fake_train(deltas, backbone, output_dir, args, config_overrides, resume_from_checkpoint):
        calls.update(args=args, overrides=config_overrides)
        history = {"global_step": 10, "saved_step": 4, "best_step": 4, "best_val_loss": 0.5}  # what the CLI reports
        (Path(output_dir) / "training_history.json").write_text(json.dumps(history))

    monkeypatch.setattr("ocd_hf.methods.ocd.train_hypernetwork", fake_train)
    monkeypatch.setattr("ocd_hf.cli.load_model", lambda args: None)
    main(["train", "--model", "m", "--deltas", "d", "--output-dir", str(tmp_path), "--scheduler-class", "DPMSolverMultistepScheduler",
          "--report-to", "tensorboard"])
    assert calls["overrides"]["scheduler_class"] == "DPMSolverMultistepScheduler"
    assert calls["args"].report_to == ["tensorboard"]
    assert "Saved the weights of step 4 of 10 (lowest validation loss 0.5)" in capsys.readouterr().out
    main(["train", "--model", "m", "--deltas", "d", "--output-dir", str(tmp_path)])
    assert calls["overrides"]["scheduler_class"] == "DDIMScheduler" and calls["args"].report_to == []
    with pytest.raises(SystemExit):
        main(["train", "--model", "m", "--deltas", "d", "--output-dir", str(tmp_path), "--scheduler-class", "NoSuchScheduler"])


HARVEST_CLASSES = ["bad", "good", "neutral"]  # the sorted string labels the harvest maps to 0, 1, 2


@pytest.fixture
def text_workspace(tmp_path):
    """A tiny BERT saved with its word-level tokenizer, and raw texts with string labels: train uses all three
    classes, test only 'good' and 'neutral' (mapped by its own sorted names they would become 0 and 1, not 1 and 2)."""
    from transformers import BertTokenizerFast

    tiny_bert().save_pretrained(tmp_path / "backbone")
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *[f"w{i}" for i in range(45)]]) + "\n")
    BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(tmp_path / "backbone")
    rng = torch.Generator().manual_seed(5)

    def texts(rows: int) -> list[str]:
        return [" ".join(f"w{int(i)}" for i in torch.randint(0, 45, (int(n),), generator=rng)) for n in torch.randint(1, 9, (rows,), generator=rng)]

    from datasets import DatasetDict

    DatasetDict({
        "train": Dataset.from_dict({"text": texts(18), "verdict": [HARVEST_CLASSES[i % 3] for i in range(18)]}),
        "test": Dataset.from_dict({"text": texts(8), "verdict": ["good", "neutral", "neutral", "good", "neutral", "good", "good", "neutral"]}),
    }).save_to_disk(str(tmp_path / "reviews"))
    return tmp_path


def test_evaluate_reads_raw_text_and_string_labels_as_the_harvest_does(text_workspace, monkeypatch, capsys):
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    from ocd_hf.results import ResultsTable

    root, model, reviews = text_workspace, str(text_workspace / "backbone"), str(text_workspace / "reviews")
    main(["harvest", "--model", model, "--dataset", reviews, "--text-column", "text", "--label-column", "verdict",
          "--target-module", "classifier", "--output-dir", str(root / "deltas"), "--batch-size", "6", "--delta-storage", "full"])
    monkeypatch.setattr("ocd_hf.methods.ocd.configuration.DEFAULT_DENOISER_CONFIG", TINY_DENOISER)
    main(["train", "--model", model, "--deltas", str(root / "deltas"), "--output-dir", str(root / "ocd"), "--num-steps", "2",
          "--batch-size", "8", "--delta-mode", "full", "--num-inference-steps", "2"])
    assert OCDWrapper.from_pretrained(root / "ocd").config.id2label == dict(enumerate(HARVEST_CLASSES))  # recorded by training

    # The reference: the test split tokenized and padded by hand, labels mapped with the harvest's class names.
    test = load_from_disk(reviews)["test"]
    encoded = AutoTokenizer.from_pretrained(model)(list(test["text"]), padding=True, truncation=True, max_length=128)
    labels = [HARVEST_CLASSES.index(name) for name in test["verdict"]]
    Dataset.from_dict({**encoded, "label": labels}).save_to_disk(str(root / "tokenized"))
    common = ["--deltas", str(root / "deltas"), "--seeds", "0", "--num-samples", "2", "--batch-size", "8"]
    main(["evaluate", str(root / "ocd"), str(root / "tokenized"), str(root / "eval-tokenized"), *common])
    main(["evaluate", str(root / "ocd"), reviews, str(root / "eval-raw"), "--split", "test", "--text-column", "text",
          "--label-column", "verdict", *common])
    tokenized, raw = (ResultsTable.from_json(root / name / "results.json") for name in ("eval-tokenized", "eval-raw"))
    assert raw.metadata["num_examples"] == 8
    assert [row.name for row in raw.rows] == [row.name for row in tokenized.rows]
    for expected, row in zip(tokenized.rows, raw.rows):
        assert row.values == expected.values, row.name
    capsys.readouterr()

    bad = ["evaluate", str(root / "ocd"), reviews, str(root / "eval-bad"), "--split", "test", "--label-column", "verdict"]
    for extra, phrase in (
        (["--text-column", "body"], "text_column (--text-column) 'body' is not a column of the dataset (columns: ['text', 'verdict'])"),
        (["--text-column", "text", "--max-length", "0"], "max_length (--max-length) must be a positive number of tokens, got 0"),
        (["--text-column", "text", "--label-column", "text"], "labels ["),  # texts are not among the class names
    ):
        with pytest.raises(SystemExit):
            main([*bad, *extra])
        error = capsys.readouterr().err
        assert phrase in error, error
    assert "not among the class names ['bad', 'good', 'neutral']" in error

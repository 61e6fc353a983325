"""Sharing on the Hub, against the loopback Hub server: hypernetworks (push, pull, card, errors,
offline, revisions) and delta datasets (push, byte-exact load)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from conftest import TINY_DENOISER, text_batch, tiny_bert
from huggingface_hub import CommitOperationAdd, DatasetCard, EvalResult, HfApi, ModelCard, constants, hf_hub_download
from huggingface_hub.errors import (
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors.torch import save_file
from transformers import BertTokenizerFast

import ocd_hf.methods.ocd.modeling as modeling_ocd
from ocd_hf import OCDWrapper
from ocd_hf.cards import GENERATED_END, GENERATED_START, template_path
from ocd_hf.cli import push_hypernetwork_from_directory
from ocd_hf.methods.ocd.deltas import load_deltas, load_harvest_metadata
from ocd_hf.methods.ocd.harvest import harvest_deltas
from ocd_hf.methods.ocd.hub import load_deltas_from_hub, push_deltas_to_hub
from ocd_hf.results import ResultRow, ResultsTable

TINY_OCD = {"denoiser_config": TINY_DENOISER, "condition_hidden_dim": 16}
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "an", "example", "input", ".", "good", "bad", "tea"]


def make_ocd(backbone, base_model: str, seed: int = 0) -> OCDWrapper:
    torch.manual_seed(seed)
    return OCDWrapper.attach(
        backbone, "classifier", text_batch(), base_model_name_or_path=base_model,
        harvest_config={"optimizer": "adam", "lr": 5e-4, "steps": 3}, **TINY_OCD,
    )


def logits(model: OCDWrapper, seed: int = 3) -> torch.Tensor:
    return model(**text_batch(), num_samples=2, generator=torch.Generator().manual_seed(seed)).logits


def commits(loopback_hub, repo: str, kind: str = "models") -> list[str]:
    """Titles of the commits of ``repo`` stored by the server."""
    return [commit["title"] for commit in loopback_hub.server.load(kind, repo)["commits"].values()]


@pytest.fixture
def local_backbone(tmp_path: Path) -> tuple[torch.nn.Module, str]:
    backbone = tiny_bert()
    backbone.save_pretrained(tmp_path / "backbone")
    return backbone, str(tmp_path / "backbone")


def test_push_pull_round_trip_in_one_commit_loads_the_backbone_named_in_the_config(loopback_hub, local_backbone):
    backbone, backbone_dir = local_backbone
    ocd = make_ocd(backbone, backbone_dir)
    commit = ocd.push_to_hub("ocd-tiny", commit_message="first")

    repo = f"{loopback_hub.user}/ocd-tiny"
    assert HfApi().model_info(repo).sha == commit.oid
    assert sorted(HfApi().list_repo_files(repo)) == ["README.md", "config.json", "model.safetensors"]
    assert commits(loopback_hub, repo) == ["initial commit", "first"]  # all three files in one commit
    loaded = OCDWrapper.from_pretrained(repo)  # no backbone given: the one named in the config is loaded
    assert type(loaded.backbone).__name__ == "BertForSequenceClassification" and loaded.backbone is not backbone
    for name, tensor in ocd.hypernetwork.state_dict().items():
        assert torch.equal(tensor, loaded.hypernetwork.state_dict()[name]), name
    torch.testing.assert_close(logits(loaded), logits(ocd), atol=0, rtol=0)


def test_revision_for_push_and_pull(loopback_hub, local_backbone):
    backbone, backbone_dir = local_backbone
    first, second = make_ocd(backbone, backbone_dir, seed=0), make_ocd(backbone, backbone_dir, seed=1)
    first.push_to_hub("ocd-rev")
    second.push_to_hub("ocd-rev", revision="dev")
    repo = f"{loopback_hub.user}/ocd-rev"

    main, dev = OCDWrapper.from_pretrained(repo, backbone=backbone), OCDWrapper.from_pretrained(repo, revision="dev", backbone=backbone)
    torch.testing.assert_close(logits(main), logits(first), atol=0, rtol=0)
    torch.testing.assert_close(logits(dev), logits(second), atol=0, rtol=0)
    assert not torch.equal(logits(main), logits(dev))


def write_tokenizer(directory: Path) -> None:
    (directory / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    BertTokenizerFast(vocab_file=str(directory / "vocab.txt")).save_pretrained(directory)


def test_card_metadata_user_sections_and_usage_snippet(loopback_hub, tmp_path):
    api = HfApi()
    backbone = tiny_bert()
    backbone.save_pretrained(tmp_path / "bert")
    write_tokenizer(tmp_path / "bert")
    base_model = api.create_repo("tiny-bert").repo_id
    api.upload_folder(repo_id=base_model, folder_path=tmp_path / "bert")
    ocd = make_ocd(backbone, base_model)
    result = EvalResult(
        task_type="text-classification", dataset_type="user/reviews", dataset_name="Reviews", metric_type="accuracy",
        metric_value=0.75,
    )
    table = "| row | accuracy |\n|---|---|\n| base | 0.70 |\n| ocd_ens5 | 0.75 |\n| oracle † | 0.90 |"
    ocd.push_to_hub("ocd-card", eval_results=[result], results_table=table, model_card_kwargs={"datasets": ["user/reviews"]})
    repo = f"{loopback_hub.user}/ocd-card"

    card = ModelCard.load(repo)
    assert card.data.library_name == "ocd-hf" and card.data.base_model == base_model
    assert {"ocd", "hypernetwork", "diffusion", "classification"} <= set(card.data.tags)
    assert card.data.datasets == ["user/reviews"] and card.data.metrics == ["accuracy"]
    assert card.data.eval_results[0].metric_value == 0.75 and card.data.eval_results[0].dataset_type == "user/reviews"
    assert "oracle †" in card.text and "Linear(16 → 3)" in card.text and "`lr` | 0.0005" in card.text

    # The usage snippet of the card runs as written (the backbone and its tokenizer come from the Hub).
    (snippet,) = re.findall(r"```python\n(.*?)```", card.text, flags=re.S)
    namespace: dict = {}
    exec(compile(snippet, "card-usage", "exec"), namespace)  # noqa: S102 - our own generated snippet
    assert namespace["outputs"].logits.shape == (1, 3)

    # A user edits the card on the Hub; pushing again keeps the edits and refreshes the generated block.
    edited = card.text.replace(GENERATED_START, "## Intended use\n\nHand-written intro.\n\n" + GENERATED_START)
    edited += "\n## My notes\n\nKeep me.\n"
    card.data.license = "mit"
    card.data.tags = [*card.data.tags, "my-tag"]
    api.upload_file(path_or_fileobj=f"---\n{card.data.to_yaml()}\n---\n{edited}".encode(), path_in_repo="README.md", repo_id=repo)
    ocd.push_to_hub("ocd-card", model_card_kwargs={"training_config": {"learning_rate": 0.0003}})

    updated = ModelCard.load(repo)
    assert "Hand-written intro." in updated.text and "## My notes\n\nKeep me." in updated.text
    assert updated.text.index("Hand-written intro.") < updated.text.index(GENERATED_START)
    assert updated.text.count(GENERATED_START) == updated.text.count(GENERATED_END) == 1
    assert "`learning_rate` | 0.0003" in updated.text
    assert updated.data.license == "mit" and "my-tag" in updated.data.tags and "ocd" in updated.data.tags
    assert updated.data.library_name == "ocd-hf"


def test_push_from_a_directory_with_results_and_training_history(loopback_hub, local_backbone, tmp_path):
    backbone, backbone_dir = local_backbone
    make_ocd(backbone, backbone_dir).save_pretrained(tmp_path / "ocd")
    (tmp_path / "ocd" / "training_history.json").write_text(json.dumps({"global_step": 40, "settings": {"batch_size": 8}}))
    rows = [
        ResultRow("base", "reference", "the backbone alone", {"accuracy": [0.6]}),
        ResultRow("ocd_ens5", "OCD", "OCD, ensemble", {"accuracy": [0.7, 0.8]}),
        ResultRow("oracle", "bound", "uses the test label", {"accuracy": [0.9]}),
    ]
    ResultsTable(rows).to_json(tmp_path / "results.json")
    push_hypernetwork_from_directory(
        str(tmp_path / "ocd"), "ocd-dir", results_path=str(tmp_path / "results.json"), dataset_id="user/reviews",
        dataset_split="test",
    )
    card = ModelCard.load(f"{loopback_hub.user}/ocd-dir")
    (result,) = card.data.eval_results  # the OCD row only: not the base model, not the bound
    assert (result.task_type, result.metric_name, result.dataset_split) == ("text-classification", "accuracy (ocd_ens5)", "test")
    assert result.metric_value == pytest.approx(0.75)
    assert "oracle †" in card.text and "`batch_size` | 8" in card.text and "`steps` | 40" in card.text


def test_save_pretrained_writes_a_card_that_keeps_user_text(tmp_path):
    ocd = make_ocd(tiny_bert(), "user/tiny-bert")
    ocd.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["README.md", "config.json", "model.safetensors"]
    readme = tmp_path / "README.md"
    card = ModelCard.load(readme)
    assert card.data.library_name == "ocd-hf" and "model-index" not in card.data.to_dict()
    readme.write_text(readme.read_text() + "\n## Local notes\n\nmine\n")
    ocd.save_pretrained(tmp_path, model_card_kwargs={"results_table": "| row | mse |\n|---|---|\n| base | 1.0 |"})
    text = readme.read_text()
    assert "## Local notes\n\nmine" in text and "| base | 1.0 |" in text
    with pytest.raises(TypeError, match="Unknown model card arguments"):
        ocd.save_pretrained(tmp_path, model_card_kwargs={"licence": "mit"})


def test_template_is_found():
    assert template_path("ocd_model_card.md").is_file()
    with pytest.raises(FileNotFoundError, match="reinstall ocd-hf"):
        template_path("missing.md")


def test_missing_repo_revision_and_file_are_clear_errors(loopback_hub, local_backbone):
    backbone, backbone_dir = local_backbone
    make_ocd(backbone, backbone_dir).push_to_hub("ocd-err")
    repo = f"{loopback_hub.user}/ocd-err"
    with pytest.raises(RepositoryNotFoundError, match="has no model repo of that name"):
        OCDWrapper.from_pretrained("user/never-pushed", backbone=backbone)
    with pytest.raises(RevisionNotFoundError, match="has no revision 'v9'"):
        OCDWrapper.from_pretrained(repo, revision="v9", backbone=backbone)
    HfApi().delete_file("model.safetensors", repo)
    with pytest.raises(RemoteEntryNotFoundError, match="has no file 'model.safetensors'"):
        OCDWrapper.from_pretrained(repo, backbone=backbone)
    with pytest.raises(ValueError, match="neither a local directory nor a valid Hub repo id"):
        OCDWrapper.from_pretrained("not a/valid/../id", backbone=backbone)


def test_corrupt_weights_fail_before_anything_is_built(loopback_hub, local_backbone, tmp_path, monkeypatch):
    backbone, backbone_dir = local_backbone
    ocd = make_ocd(backbone, backbone_dir)
    ocd.push_to_hub("ocd-bad")
    repo = f"{loopback_hub.user}/ocd-bad"
    good = Path(hf_hub_download(repo, "model.safetensors")).read_bytes()
    backbone_loads = []
    monkeypatch.setattr(modeling_ocd, "load_backbone", lambda config, **kw: backbone_loads.append(config))

    HfApi().upload_file(path_or_fileobj=good[: len(good) // 2], path_in_repo="model.safetensors", repo_id=repo)
    with pytest.raises(ValueError, match="corrupt or truncated"):
        OCDWrapper.from_pretrained(repo)
    state = {name: tensor.clone() for name, tensor in ocd.hypernetwork_state_dict().items()}
    next(iter(state.values())).view(-1)[0] = float("nan")
    save_file(state, tmp_path / "nan.safetensors")
    HfApi().upload_file(path_or_fileobj=tmp_path / "nan.safetensors", path_in_repo="model.safetensors", repo_id=repo)
    with pytest.raises(ValueError, match="non-finite values"):
        OCDWrapper.from_pretrained(repo)
    assert backbone_loads == []  # the weights were refused before the backbone was fetched


def test_truncated_cache_file_is_refused_and_force_download_repairs_it(loopback_hub, local_backbone):
    backbone, backbone_dir = local_backbone
    ocd = make_ocd(backbone, backbone_dir)
    ocd.push_to_hub("ocd-cache")
    repo = f"{loopback_hub.user}/ocd-cache"
    cached = Path(hf_hub_download(repo, "model.safetensors")).resolve()
    cached.write_bytes(cached.read_bytes()[:100])
    with pytest.raises(ValueError, match="force_download=True"):
        OCDWrapper.from_pretrained(repo, backbone=backbone)
    repaired = OCDWrapper.from_pretrained(repo, backbone=backbone, force_download=True)
    torch.testing.assert_close(logits(repaired), logits(ocd), atol=0, rtol=0)


def test_offline_load_from_the_cache_without_a_server(loopback_hub, local_backbone, monkeypatch):
    backbone, backbone_dir = local_backbone
    make_ocd(backbone, backbone_dir).push_to_hub("ocd-offline")
    repo = f"{loopback_hub.user}/ocd-offline"
    expected = logits(OCDWrapper.from_pretrained(repo))  # fills the cache
    loopback_hub.stop()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets at import

    torch.testing.assert_close(logits(OCDWrapper.from_pretrained(repo)), expected, atol=0, rtol=0)
    with pytest.raises(LocalEntryNotFoundError, match="not in the local cache") as error:
        OCDWrapper.from_pretrained(f"{loopback_hub.user}/never-downloaded")
    assert "HF_HUB_OFFLINE=1" in str(error.value)


# ----- delta datasets -----------------------------------------------------------------------------


def harvest(tmp_path: Path, dtype: str) -> Path:
    gen = torch.Generator().manual_seed(0)
    source = datasets.Dataset.from_dict({
        "input_ids": torch.randint(0, 50, (7, 6), generator=gen).tolist(),
        "attention_mask": torch.ones(7, 6, dtype=torch.long).tolist(),
        "label": torch.randint(0, 3, (7,), generator=gen).tolist(),
    })
    output_dir = tmp_path / f"deltas-{dtype}"
    harvest_deltas(
        tiny_bert(), source, "classifier", output_dir, batch_size=4, shard_size=4, dtype=dtype, delta_storage="full", progress=False
    )
    return output_dir


def column_bytes(dataset: datasets.Dataset) -> dict[str, bytes]:
    table = dataset.with_format("numpy")[:]
    return {name: np.asarray(values).tobytes() for name, values in table.items()}


@pytest.mark.parametrize("dtype, revision", [("float32", None), ("bfloat16", "experiment")])
def test_delta_dataset_push_and_load_are_byte_exact(loopback_hub, tmp_path, dtype, revision):
    path = harvest(tmp_path, dtype)
    commit = push_deltas_to_hub(path, "ocd-deltas", revision=revision)
    repo = f"{loopback_hub.user}/ocd-deltas"

    raw = datasets.Dataset.from_file  # the shards as written by the harvest, without any decoding
    original = datasets.concatenate_datasets([raw(str(shard)) for shard in sorted((path / "data").glob("*.arrow"))])
    pulled = datasets.load_dataset(repo, split="train", revision=revision)
    assert pulled.features == original.features
    assert column_bytes(pulled) == column_bytes(original)

    deltas, metadata = load_deltas_from_hub(repo, revision=revision)
    assert metadata == load_harvest_metadata(path)
    local = load_deltas(path)
    for name in ("delta", "rho", "layer_input", "label"):
        assert torch.equal(deltas[:][name], local[:][name]), name
    assert deltas[:]["delta"].dtype == torch.float32

    files = HfApi().list_repo_files(repo, repo_type="dataset", revision=revision)
    assert "harvest.json" in files and any(f.endswith(".parquet") for f in files)
    assert HfApi().dataset_info(repo, revision=revision).sha == commit.oid
    card = DatasetCard.load(hf_hub_download(repo, "README.md", repo_type="dataset", revision=revision))
    assert card.data.configs[0]["data_files"][0]["path"] == "data/train-*"  # points at the parquet files
    assert "OCD weight deltas for `classifier`" in card.text and card.data.dataset_info is not None
    if revision is not None:
        assert HfApi().list_repo_files(repo, repo_type="dataset") == []  # main is untouched


def test_push_deltas_of_an_in_memory_dataset_needs_its_metadata(loopback_hub, tmp_path):
    path = harvest(tmp_path, "float32")
    with pytest.raises(ValueError, match="Pass the harvest metadata"):
        push_deltas_to_hub(load_deltas(path), "ocd-deltas-mem")
    push_deltas_to_hub(load_deltas(path), "ocd-deltas-mem", metadata=load_harvest_metadata(path))
    deltas, metadata = load_deltas_from_hub(f"{loopback_hub.user}/ocd-deltas-mem")
    assert len(deltas) == metadata["num_samples"] == 7
    with pytest.raises(RepositoryNotFoundError, match="no dataset repo"):
        load_deltas_from_hub("user/no-such-deltas")
    api = HfApi()
    api.create_commit(f"{loopback_hub.user}/ocd-deltas-mem", repo_type="dataset", commit_message="stale metadata",
                      operations=[CommitOperationAdd("harvest.json", json.dumps({**metadata, "num_samples": 3}).encode())])
    with pytest.raises(ValueError, match="different pushes"):
        load_deltas_from_hub(f"{loopback_hub.user}/ocd-deltas-mem")

"""Faults of weight datasets (issue 16): tampered or truncated shards, concurrent harvests, interrupted Hub pushes.

Every harvest here is a tiny seeded Bert (8 rows, 2 shards of 4) or a tiny Mc-Di head harvest; each test
damages the directory the way a user, a disk or a second process would and checks the error names the
file and the fix, or that re-running the harvest repairs it bit-exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import subprocess_env
from helpers.harvest_fixtures import CASES, build_backbone, build_dataset
from helpers.mcdi import gaussian_distribution

from ocd_hf.methods.ocd.deltas import load_deltas, load_harvest_metadata, shard_path
from ocd_hf.methods.ocd.harvest import harvest_deltas
from ocd_hf.task_heads import harvest_task_heads, load_task_heads

KIND, TARGET = CASES["bert-classifier"]


def harvest(output_dir: Path, seed: int = 1, dataset=None, **kwargs):
    """8 rows of the tiny Bert's head in 2 shards of 4 (the data's seed decides the inputs and labels)."""
    settings = {"batch_size": 4, "shard_size": 4, "delta_storage": "full", "progress": False, **kwargs}
    dataset = build_dataset(KIND, 8, seed=seed) if dataset is None else dataset
    return harvest_deltas(build_backbone(KIND), dataset, TARGET, output_dir, **settings)


def rows(dataset) -> dict[str, torch.Tensor]:
    return {name: dataset[:][name] for name in ("id", "label", "delta", "layer_input")}


def assert_same_rows(first, second) -> None:
    a, b = rows(first), rows(second)
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.fixture
def harvested(tmp_path) -> Path:
    harvest(tmp_path / "deltas")
    return tmp_path / "deltas"


# ----- verified weight datasets (point 5) -----------------------------------------------------------------


def test_metadata_records_each_shard_range_count_size_and_sha256(harvested):
    records = load_harvest_metadata(harvested)["shards"]
    assert [record["file"] for record in records] == ["data/train-00000-of-00002.arrow", "data/train-00001-of-00002.arrow"]
    for index, record in enumerate(records):
        data = shard_path(harvested, index, 2).read_bytes()
        assert record["row_range"] == [4 * index, 4 * index + 4] and record["num_rows"] == 4
        assert (record["first_id"], record["last_id"]) == (4 * index, 4 * index + 3)
        assert record["num_bytes"] == len(data) and record["sha256"] == hashlib.sha256(data).hexdigest()
    assert not (harvested / ".shard_records").exists()  # the per-shard records are merged into harvest.json


def test_shard_from_another_harvest_is_found_by_verify(harvested, tmp_path):
    harvest(tmp_path / "other", seed=7)  # same layer, same sizes, other rows
    shutil.copyfile(shard_path(tmp_path / "other", 0, 2), shard_path(harvested, 0, 2))
    with pytest.raises(ValueError, match=r"train-00000-of-00002\.arrow.*sha256.*Run the harvest again"):
        load_deltas(harvested, verify=True)


def test_duplicated_shard_is_refused(harvested):
    shutil.copyfile(shard_path(harvested, 0, 2), shard_path(harvested, 1, 2))  # ids 0-3 twice, 4-7 gone
    with pytest.raises(ValueError, match=r"train-00001-of-00002\.arrow.*copy of another shard"):
        load_deltas(harvested)


def test_edited_dtype_in_the_metadata_is_refused(harvested):
    metadata = load_harvest_metadata(harvested)
    metadata["harvest_config"]["dtype"] = "bfloat16"  # float32 bits would be read as bfloat16 pairs
    (harvested / "harvest.json").write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match=r"says dtype 'bfloat16'.*shards store 'delta' as float32"):
        load_deltas(harvested)


def test_stray_shard_is_refused_by_load_and_by_a_resumed_harvest(harvested):
    stray = harvested / "data" / "train-00000-of-00003.arrow"  # e.g. left by an older harvest with 3 shards
    shutil.copyfile(shard_path(harvested, 0, 2), stray)
    with pytest.raises(ValueError, match=r"train-00000-of-00003\.arrow.*load_dataset.*Delete them"):
        load_deltas(harvested)
    with pytest.raises(ValueError, match=r"train-00000-of-00003\.arrow"):
        harvest(harvested)


def test_truncated_shard_names_the_file_and_a_rerun_repairs_it(harvested):
    expected = load_deltas(harvested)
    expected_rows = rows(expected)
    path = shard_path(harvested, 1, 2)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"train-00001-of-00002\.arrow.*truncated.*Run the harvest again"):
        load_deltas(harvested)
    repaired = harvest(harvested)  # the same call: re-harvests the shard that fails verification
    for name, value in rows(repaired).items():
        assert torch.equal(value, expected_rows[name]), name
    load_deltas(harvested, verify=True)


def test_resume_reharvests_a_shard_whose_content_changed(tmp_path):
    harvest(tmp_path / "other", seed=7)
    path = tmp_path / "deltas"
    reference = rows(harvest(path))
    shutil.copyfile(shard_path(tmp_path / "other", 0, 2), shard_path(path, 0, 2))  # same size, other content
    for name, value in rows(harvest(path)).items():
        assert torch.equal(value, reference[name]), name


def test_head_datasets_inherit_the_verification(tmp_path):
    settings = {"num_tasks": 6, "n_way": 3, "k_shot": 1, "steps": 4, "num_targets": 2, "batch_size": 3, "shard_size": 3,
                "progress": False}
    distribution = gaussian_distribution(num_classes=8, per_class=4, dim=4)
    expected = harvest_task_heads(distribution, tmp_path, **settings)[:]["targets"]
    path = tmp_path / "data" / "train-00001-of-00002.arrow"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"train-00001-of-00002\.arrow.*truncated"):
        load_task_heads(tmp_path)
    assert torch.equal(harvest_task_heads(distribution, tmp_path, **settings)[:]["targets"], expected)


# ----- resuming with other inputs (point 3) -------------------------------------------------------------------


def interrupted_harvest(output_dir: Path, dataset, monkeypatch, **kwargs) -> None:
    """Harvest ``dataset`` into ``output_dir`` and stop it (as a kill would) while it writes the second shard."""
    from ocd_hf.weight_datasets import ShardWriter

    original = ShardWriter.write

    def write(writer, columns):
        if "00001-of" in writer.path.name:
            raise KeyboardInterrupt("killed")
        return original(writer, columns)

    with monkeypatch.context() as patch:
        patch.setattr(ShardWriter, "write", write)
        with pytest.raises(KeyboardInterrupt):
            harvest_deltas(build_backbone(KIND), dataset, TARGET, output_dir, batch_size=4, shard_size=4,
                           delta_storage="full", progress=False, **kwargs)


def test_resuming_with_other_inputs_but_the_same_labels_is_refused(tmp_path, monkeypatch):
    first = build_dataset(KIND, 8, seed=1)
    other_inputs = first.map(lambda row: {"input_ids": [(token + 1) % 50 for token in row["input_ids"]]})
    assert other_inputs["label"] == first["label"]
    interrupted_harvest(tmp_path, first, monkeypatch)
    with pytest.raises(ValueError, match=r"other settings or other data.*source\.inputs_sha256 \(directory: '\w+', this call: '\w+'\)"):
        harvest(tmp_path, dataset=other_inputs)
    assert len(harvest(tmp_path)) == 8  # the original inputs resume


def test_resuming_with_another_collate_fn_is_refused(tmp_path, monkeypatch):
    dataset = build_dataset(KIND, 8, seed=1)

    def collate(shift):
        return lambda batch: {
            "input_ids": (torch.tensor(batch["input_ids"]) + shift) % 50, "attention_mask": torch.tensor(batch["attention_mask"]),
        }

    interrupted_harvest(tmp_path, dataset, monkeypatch, collate_fn=collate(0))
    with pytest.raises(ValueError, match=r"source\.first_batch_sha256 \(directory"):
        harvest(tmp_path, dataset=dataset, collate_fn=collate(1))


def test_resuming_a_head_harvest_with_other_embeddings_is_refused(tmp_path):
    from ocd_hf.episodes import TaskDistribution

    settings = {"num_tasks": 3, "n_way": 3, "k_shot": 1, "steps": 4, "num_targets": 2, "batch_size": 3, "progress": False}
    distribution = gaussian_distribution(num_classes=8, per_class=4, dim=4)
    harvest_task_heads(distribution, tmp_path, **settings)
    moved = distribution.dataset.map(lambda row: {"embedding": [value + 1.0 for value in row["embedding"]]})
    with pytest.raises(ValueError, match=r"source\.inputs_sha256"):
        harvest_task_heads(TaskDistribution(moved), tmp_path, **settings)


# ----- one harvest at a time (point 4) ----------------------------------------------------------------------

HOLDER = """
import sys
from ocd_hf.weight_datasets import harvest_lock
with harvest_lock(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.readline()
"""


def test_a_second_harvest_is_refused_naming_the_holder_and_a_dead_holder_is_taken_over(tmp_path, library_logs):
    output_dir = tmp_path / "deltas"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(output_dir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env=subprocess_env(),
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RuntimeError, match=rf"is locked by another harvest: pid {holder.pid} on host .*another output_dir"):
            harvest(output_dir)
        assert not (output_dir / "data").exists(), "nothing was written by the refused harvest"
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # dies holding the lock: the kernel releases it
        holder.wait()
    with library_logs.at_level("WARNING"):
        dataset = harvest(output_dir)
    assert f"pid {holder.pid}" in library_logs.text and "taking the lock over" in library_logs.text
    assert len(dataset) == 8 and not (output_dir / ".harvest.lock.json").exists()


def test_unwritable_output_dir_is_refused_before_any_work(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match=r"output_dir=.*a-file/deltas.*is not a writable directory"):
        harvest(blocker / "deltas")


# ----- one-commit pushes, pinned pulls (point 2) and an unreachable Hub ------------------------------------


def dataset_commits(loopback_hub, repo: str) -> list[str]:
    return [commit["title"] for commit in loopback_hub.server.load("datasets", repo)["commits"].values()]


def test_push_is_one_commit_and_a_failure_between_files_changes_nothing(loopback_hub, tmp_path, monkeypatch):
    import hub_server
    from huggingface_hub import HfApi

    from ocd_hf.methods.ocd.hub import load_deltas_from_hub, push_deltas_to_hub

    first, second = tmp_path / "first", tmp_path / "second"
    harvest(first)
    harvest(second, seed=7)
    repo = f"{loopback_hub.user}/deltas"
    commit = push_deltas_to_hub(first, "deltas", commit_message="first push", max_shard_size=1000)  # several parquet files
    assert dataset_commits(loopback_hub, repo) == ["initial commit", "first push"]
    files = HfApi().list_repo_files(repo, repo_type="dataset")
    assert {"README.md", "harvest.json"} <= set(files) and sum(name.endswith(".parquet") for name in files) >= 2

    uploads, original = [], hub_server._Handler.lfs_upload

    def fail_after_the_first_file(handler, oid):
        uploads.append(oid)
        if len(uploads) > 1:
            raise hub_server.HubError(400, "connection dropped (injected)")
        return original(handler, oid)

    monkeypatch.setattr(hub_server._Handler, "lfs_upload", fail_after_the_first_file)
    with pytest.raises(Exception, match="Error while uploading"):
        push_deltas_to_hub(second, "deltas", commit_message="second push", max_shard_size=1000)
    assert len(uploads) > 1, "the failure was injected between two files"
    assert HfApi().dataset_info(repo).sha == commit.oid, "the repo is exactly as the first push left it"
    deltas, metadata = load_deltas_from_hub(repo)
    assert metadata == load_harvest_metadata(first)
    assert_same_rows(deltas, load_deltas(first))


def test_pull_reads_rows_and_metadata_of_one_commit(loopback_hub, tmp_path):
    from huggingface_hub import CommitOperationAdd, HfApi

    from ocd_hf.methods.ocd.hub import load_deltas_from_hub, push_deltas_to_hub

    first, second = tmp_path / "first", tmp_path / "second"
    harvest(first)
    harvest(second, seed=7)
    repo = f"{loopback_hub.user}/deltas"
    old = push_deltas_to_hub(first, "deltas")
    load_deltas_from_hub(repo)  # this machine has the first push cached
    push_deltas_to_hub(second, "deltas")
    deltas, metadata = load_deltas_from_hub(repo)
    assert metadata == load_harvest_metadata(second)
    assert_same_rows(deltas, load_deltas(second))
    deltas, metadata = load_deltas_from_hub(repo, revision=old.oid)
    assert metadata == load_harvest_metadata(first)
    assert_same_rows(deltas, load_deltas(first))

    # Rows replaced behind the metadata's back (same row counts): found by verify=True, naming the file.
    parquet = sorted(name for name in HfApi().list_repo_files(repo, repo_type="dataset", revision=old.oid) if name.endswith(".parquet"))
    api = HfApi()
    newer = [hub_file for hub_file in api.list_repo_files(repo, repo_type="dataset") if hub_file.endswith(".parquet")]
    assert newer == parquet
    from huggingface_hub import hf_hub_download

    stale = hf_hub_download(repo, parquet[0], repo_type="dataset", revision=old.oid)
    api.create_commit(repo, repo_type="dataset", commit_message="swap rows",
                      operations=[CommitOperationAdd(parquet[0], stale)])
    with pytest.raises(ValueError, match=rf"{parquet[0]}.*not the file pushed"):
        load_deltas_from_hub(repo, verify=True)


def test_unreachable_hub_is_a_clear_error_naming_its_url(loopback_hub, harvested):
    from ocd_hf.methods.ocd.hub import load_deltas_from_hub, push_deltas_to_hub

    endpoint = loopback_hub.endpoint
    loopback_hub.stop()
    with pytest.raises(ConnectionError, match=rf"Could not reach the Hub at {endpoint}.*HF_ENDPOINT"):
        push_deltas_to_hub(harvested, "deltas")
    with pytest.raises(FileNotFoundError, match=rf"Hub at {endpoint}.*HF_ENDPOINT"):
        load_deltas_from_hub("user/deltas")


# ----- a hand-written README.md survives harvests (point 9) ------------------------------------------------


def test_harvest_keeps_a_hand_written_readme_outside_the_generated_block(tmp_path):
    from huggingface_hub import DatasetCard

    from ocd_hf.cards import GENERATED_END, GENERATED_START

    output_dir = tmp_path / "deltas"
    output_dir.mkdir()
    (output_dir / "README.md").write_text("---\nlicense: mit\n---\n# My deltas\n\nNotes I wrote by hand.\n")
    harvest(output_dir)
    harvest(output_dir)  # the same call again (a no-op resume) rewrites the card
    card = DatasetCard.load(output_dir / "README.md")
    assert card.text.startswith("# My deltas\n\nNotes I wrote by hand.")
    assert card.text.count(GENERATED_START) == 1 and card.text.count(GENERATED_END) == 1
    assert "OCD weight deltas for `classifier`" in card.text
    assert card.data.license == "mit" and card.data.configs[0]["data_files"][0]["path"] == "data/train-*.arrow"


def test_cards_render_as_huggingface_hub_renders_them_and_follow_an_edited_template(tmp_path, monkeypatch):
    from huggingface_hub import DatasetCard, DatasetCardData

    from ocd_hf import cards
    from ocd_hf.methods.ocd.model_card import delta_dataset_card

    output_dir = tmp_path / "deltas"
    harvest(output_dir)
    metadata = load_harvest_metadata(output_dir)
    card = delta_dataset_card(metadata)
    # The reference: huggingface_hub's own from_template, which compiles the template on every call.
    captured = {}
    monkeypatch.setattr(cards, "card_from_template", lambda card_type, data, template, **kwargs: captured.update(
        data=data, template=template, kwargs=kwargs) or card)
    delta_dataset_card(metadata)
    reference = DatasetCard.from_template(captured["data"], template_path=str(cards.template_path(captured["template"])),
                                          **captured["kwargs"])
    assert isinstance(card, DatasetCard) and card.content == reference.content
    monkeypatch.undo()
    # The compiled template is reused, and compiled again when the file changes.
    template = tmp_path / "model_cards" / "tiny.md"
    template.parent.mkdir()
    monkeypatch.setattr(cards, "TEMPLATE_DIRS", (template.parent,))
    data = DatasetCardData(pretty_name="tiny")
    for text, modified_ns in (("first", 1), ("second", 2)):  # distinct modification times, whatever the clock's resolution
        template.write_text(f"---\n{{{{ card_data }}}}\n---\n{text} {{{{ word }}}}\n")
        os.utime(template, ns=(modified_ns, modified_ns))
        if text == "first":
            compiled = cards._compiled_template.cache_info().misses
            assert cards.card_from_template(DatasetCard, data, "tiny.md", word="a").text.strip() == "first a"
            assert cards.card_from_template(DatasetCard, data, "tiny.md", word="b").text.strip() == "first b"
            assert cards._compiled_template.cache_info().misses == compiled + 1
    assert cards.card_from_template(DatasetCard, data, "tiny.md", word="b").text.strip() == "second b"


def test_resuming_with_another_batch_size_names_it_and_the_fix(tmp_path, monkeypatch):
    dataset = build_dataset(KIND, 8, seed=1)
    interrupted_harvest(tmp_path, dataset, monkeypatch)  # batch_size=4, the second shard missing
    recorded = load_harvest_metadata(tmp_path)["batch_size"]["batch_size"]
    with pytest.raises(ValueError) as refused:
        harvest(tmp_path, dataset=dataset, batch_size=recorded + 1)
    message = str(refused.value)
    assert f"made with batch_size={recorded}, and this call passes batch_size={recorded + 1}" in message
    assert f"Pass batch_size={recorded}, or batch_size=None" in message and "new output_dir" in message
    assert len(harvest(tmp_path, dataset=dataset, batch_size=None)) == 8  # None keeps the recorded batch size: it resumes

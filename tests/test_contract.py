"""The contract every weight generator meets, run over every method (see tests/helpers/contract.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_DENOISER, text_batch, tiny_bert
from datasets import Dataset
from helpers.contract import GeneratorCase, state_of
from helpers.d2nwg import tiny_d2nwg
from helpers.mcdi import DIM, gaussian_distribution, support_set, tiny_generator
from huggingface_hub import HfApi

from ocd_hf import OCDWrapper, evaluate_ocd, harvest_deltas
from ocd_hf.cards import GENERATED_END, GENERATED_START
from ocd_hf.episodes import EpisodeSampler, MetaSplit
from ocd_hf.fewshot import REFERENCE, evaluate_episodes
from ocd_hf.methods.d2nwg import D2NWGHeadGenerator
from ocd_hf.methods.mcdi import McDiHeadGenerator
from ocd_hf.results import ResultsTable
from ocd_hf.task_heads import harvest_task_heads
from ocd_hf.weight_datasets import ShardWriter

# ----- OCD ----------------------------------------------------------------------------------------

OCD_SETTINGS = {"denoiser_config": TINY_DENOISER, "condition_hidden_dim": 16, "harvest_config": {"optimizer": "adam", "lr": 5e-4, "steps": 3}}


def ocd_build() -> OCDWrapper:
    torch.manual_seed(0)
    return OCDWrapper.attach(tiny_bert(), "classifier", text_batch(), **OCD_SETTINGS)


def ocd_run(model: OCDWrapper, seed: int) -> torch.Tensor:
    return model(**text_batch(), num_samples=2, generator=torch.Generator().manual_seed(seed)).logits


def ocd_rows(num_rows: int = 12, seed: int = 5) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    inputs = text_batch(num_rows, seed=seed)
    return Dataset.from_dict({**{k: v.tolist() for k, v in inputs.items()}, "label": torch.randint(0, 3, (num_rows,), generator=generator).tolist()})


def ocd_harvest(output_dir: Path) -> Dataset:
    return harvest_deltas(tiny_bert(), ocd_rows(), "classifier", output_dir, batch_size=2, shard_size=4, progress=False)


def ocd_evaluate(model: OCDWrapper, output_dir: Path) -> ResultsTable:
    return evaluate_ocd(model, ocd_rows(8, seed=9), seeds=(0,), num_samples=2, batch_size=4, output_dir=output_dir, progress=False)


# ----- Mc-Di --------------------------------------------------------------------------------------


def mcdi_classes() -> MetaSplit:
    """Gaussian-cluster embeddings of 12 classes: heads are harvested on 6, the generator is evaluated on the other 6.
    (Built anew on every call, as a resumed harvest in a new process would.)"""
    return gaussian_distribution(num_classes=12, per_class=10, dim=DIM).class_split({"train": range(6), "test": range(6, 12)})


def mcdi_run(model: McDiHeadGenerator, seed: int) -> torch.Tensor:
    support, labels = support_set(num_tasks=2)
    return model.generate_heads(support, labels, num_samples=2, generator=torch.Generator().manual_seed(seed))


def mcdi_harvest(output_dir: Path) -> Dataset:
    return harvest_task_heads(mcdi_classes()["train"], output_dir, num_tasks=12, n_way=3, k_shot=2, steps=6, batch_size=2, shard_size=4,
                              progress=False, encoder_id="synthetic")


def mcdi_evaluate(model: McDiHeadGenerator, output_dir: Path) -> ResultsTable:
    episodes = EpisodeSampler(mcdi_classes()["test"], 3, 2, q_queries=4, seed=9).sample(8, column="embedding")

    def one_draw(support: torch.Tensor, labels: torch.Tensor, n_way: int) -> torch.Tensor:
        return model.generate_heads(support, labels, generator=torch.Generator().manual_seed(0))[:, 0]

    return evaluate_episodes(episodes, {"mcdi": one_draw}, output_dir=output_dir)


# ----- D2NWG --------------------------------------------------------------------------------------


def d2nwg_run(model: D2NWGHeadGenerator, seed: int) -> torch.Tensor:
    support, labels = support_set(num_tasks=2)
    return model.generate_heads(support, labels, num_samples=2, generator=torch.Generator().manual_seed(seed))


def d2nwg_harvest(output_dir: Path) -> Dataset:
    """D2NWG's zoo: the same per-task harvest, keeping the last checkpoints of each head's training."""
    return harvest_task_heads(mcdi_classes()["train"], output_dir, num_tasks=12, n_way=3, k_shot=2, steps=6, target_spacing="last",
                              batch_size=2, shard_size=4, progress=False, encoder_id="synthetic")


def d2nwg_evaluate(model: D2NWGHeadGenerator, output_dir: Path) -> ResultsTable:
    episodes = EpisodeSampler(mcdi_classes()["test"], 3, 2, q_queries=4, seed=9).sample(8, column="embedding")

    def one_draw(support: torch.Tensor, labels: torch.Tensor, n_way: int) -> torch.Tensor:
        return model.generate_heads(support, labels, generator=torch.Generator().manual_seed(0))[:, 0]

    return evaluate_episodes(episodes, {"d2nwg": one_draw}, output_dir=output_dir)


CASES = {
    "ocd": GeneratorCase(
        name="ocd", build=ocd_build, run=ocd_run, output_shape=(4, 3),
        load=lambda path, model: OCDWrapper.from_pretrained(path, backbone=model.backbone),
        harvest=ocd_harvest, evaluate=ocd_evaluate, library_tags=("ocd", "hypernetwork"),
        reference_row="base", reference_kind="reference", method_kind="OCD",
    ),
    "mcdi": GeneratorCase(
        name="mcdi", build=tiny_generator, run=mcdi_run, output_shape=(2, 2, 4, DIM + 1),  # (tasks, draws, N, d+1)
        load=lambda path, model: McDiHeadGenerator.from_pretrained(path),
        harvest=mcdi_harvest, evaluate=mcdi_evaluate,
        library_tags=("mcdi", "weight-generation", "few-shot", "diffusion", "few-shot-classification"),
        reference_row=REFERENCE, reference_kind="baseline", method_kind="method",
    ),
    "d2nwg": GeneratorCase(
        name="d2nwg", build=tiny_d2nwg, run=d2nwg_run, output_shape=(2, 2, 4, DIM + 1),  # (tasks, draws, N, d+1)
        load=lambda path, model: D2NWGHeadGenerator.from_pretrained(path),
        harvest=d2nwg_harvest, evaluate=d2nwg_evaluate,
        library_tags=("d2nwg", "weight-generation", "few-shot", "diffusion", "few-shot-classification"),
        reference_row=REFERENCE, reference_kind="baseline", method_kind="method",
    ),
}


@pytest.fixture(params=sorted(CASES))
def case(request) -> GeneratorCase:
    return CASES[request.param]


# ----- the contract -------------------------------------------------------------------------------


def test_output_shape_and_seeded_determinism(case):
    model = case.build()
    first, again, other = case.run(model, 0), case.run(model, 0), case.run(model, 1)
    assert tuple(first.shape) == case.output_shape
    assert torch.isfinite(first).all()
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.equal(first, other), "the sampler's seed decides the draws"


def test_save_load_round_trip_is_exact(case, tmp_path):
    model = case.build()
    model.save_pretrained(tmp_path)
    loaded = case.load(tmp_path, model)
    saved, restored = state_of(model), state_of(loaded)
    assert saved.keys() == restored.keys() and saved
    for name in saved:
        assert torch.equal(saved[name], restored[name]), name
    torch.testing.assert_close(case.run(loaded, 1), case.run(model, 1), rtol=0, atol=0)


def test_card_is_rendered_with_its_metadata(case, tmp_path):
    case.build().save_pretrained(tmp_path)
    text = (tmp_path / "README.md").read_text(encoding="utf-8")
    assert GENERATED_START in text and GENERATED_END in text
    metadata = yaml.safe_load(text.split("---")[1])
    assert metadata["library_name"] == "ocd-hf"
    assert set(case.library_tags) <= set(metadata["tags"])


def test_hub_round_trip(case, loopback_hub):
    model = case.build()
    model.push_to_hub(f"contract-{case.name}")
    repo = f"{loopback_hub.user}/contract-{case.name}"
    assert {"config.json", "model.safetensors", "README.md"} <= set(HfApi().list_repo_files(repo))
    loaded = case.load(repo, model)
    torch.testing.assert_close(case.run(loaded, 2), case.run(model, 2), rtol=0, atol=0)


def test_harvest_resumes_after_a_kill(case, tmp_path, monkeypatch):
    original_enter, original_write = ShardWriter.__enter__, ShardWriter.write
    entered, writes, kill = [], [], {}

    def recording_enter(writer):
        entered.append(writer.path.name)
        return original_enter(writer)

    def killable_write(writer, columns):
        writes.append(writer.path.name)
        if len(writes) == kill.get("at_write"):
            kill["partial"] = writer.tmp_path
            raise KeyboardInterrupt("killed while writing the second shard's last batch")
        return original_write(writer, columns)

    monkeypatch.setattr(ShardWriter, "__enter__", recording_enter)
    monkeypatch.setattr(ShardWriter, "write", killable_write)
    whole = case.harvest(tmp_path / "whole")
    shards = list(dict.fromkeys(entered))
    assert len(shards) >= 3 and len(writes) > len(shards), "several shards of several batches each, so that the kill is mid-way"
    kill["at_write"] = max(i for i, name in enumerate(writes) if name == shards[1]) + 1  # the second shard's last batch
    entered.clear()
    writes.clear()
    with pytest.raises(KeyboardInterrupt):
        case.harvest(tmp_path / "killed")
    data = tmp_path / "killed" / "data"
    assert sorted(p.name for p in data.iterdir()) == [shards[0]], "the first shard is kept, the second is not"
    kill.pop("at_write")
    kill["partial"].write_bytes(b"half a shard")  # what a hard kill, which cleans nothing up, would leave
    entered.clear()
    resumed = case.harvest(tmp_path / "killed")
    assert entered == shards[1:], "the resumed harvest writes only the missing shards"
    assert sorted(p.name for p in data.iterdir()) == sorted(shards), "no partial file is left"
    assert len(resumed) == len(whole)
    for column in whole.column_names:
        first, second = resumed[:][column], whole[:][column]
        if isinstance(first, torch.Tensor):
            torch.testing.assert_close(first, second, rtol=0, atol=0, msg=column)
        else:
            assert first == second, column


def test_results_table_has_the_reference_row(case, tmp_path):
    table = case.evaluate(case.build(), tmp_path)
    reference = table[case.reference_row]
    assert reference.kind == case.reference_kind and reference.values
    own = [row for row in table.rows if row.kind == case.method_kind]
    assert own and all(row.values for row in own), "the method's own rows are there too"
    assert {"results.json", "results.md", "results.png"} <= {p.name for p in tmp_path.iterdir()}
    assert [row.name for row in ResultsTable.from_json(tmp_path / "results.json").rows] == [row.name for row in table.rows]

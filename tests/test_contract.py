"""The contract every weight generator meets, run over every method (see tests/helpers/contract.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_DENOISER, text_batch, tiny_bert
from datasets import Dataset
from helpers.contract import GeneratorCase, state_of
from huggingface_hub import HfApi

from ocd_hf import OCDWrapper, evaluate_ocd, harvest_deltas
from ocd_hf.cards import GENERATED_END, GENERATED_START
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
    return harvest_deltas(tiny_bert(), ocd_rows(), "classifier", output_dir, batch_size=4, shard_size=4, progress=False)


def ocd_evaluate(model: OCDWrapper, output_dir: Path) -> object:
    return evaluate_ocd(model, ocd_rows(8, seed=9), seeds=(0,), num_samples=2, batch_size=4, output_dir=output_dir, progress=False)


CASES = {
    "ocd": GeneratorCase(
        name="ocd", build=ocd_build, run=ocd_run, output_shape=(4, 3),
        load=lambda path, model: OCDWrapper.from_pretrained(path, backbone=model.backbone),
        harvest=ocd_harvest, evaluate=ocd_evaluate, library_tags=("ocd", "hypernetwork"),
    ),
}


@pytest.fixture(params=sorted(CASES))
def case(request) -> GeneratorCase:
    return CASES[request.param]


# ----- the contract -------------------------------------------------------------------------------


def test_output_shape_and_seeded_determinism(case):
    model = case.build()
    first, again = case.run(model, 0), case.run(model, 0)
    assert tuple(first.shape) == case.output_shape
    assert torch.isfinite(first).all()
    torch.testing.assert_close(first, again, rtol=0, atol=0)


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
    whole = case.harvest(tmp_path / "whole")
    original_enter, entered = ShardWriter.__enter__, []

    def die_on_second_shard(writer):
        entered.append(writer.path)
        if len(entered) == 2:
            raise KeyboardInterrupt("killed while writing the second shard")
        return original_enter(writer)

    monkeypatch.setattr(ShardWriter, "__enter__", die_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        case.harvest(tmp_path / "killed")
    monkeypatch.setattr(ShardWriter, "__enter__", original_enter)
    assert len(list((tmp_path / "killed" / "data").glob("*.arrow"))) == 1, "the first shard is kept"
    resumed = case.harvest(tmp_path / "killed")
    assert len(resumed) == len(whole)
    for column in whole.column_names:
        first, second = resumed[:][column], whole[:][column]
        if isinstance(first, torch.Tensor):
            torch.testing.assert_close(first, second, rtol=0, atol=0, msg=column)
        else:
            assert first == second, column


def test_results_table_has_the_base_row(case, tmp_path):
    table = case.evaluate(case.build(), tmp_path)
    base = table["base"]
    assert base.kind == "reference" and base.values
    assert {row.kind for row in table.rows} - {"reference"}, "the method's own rows are there too"
    assert {"results.json", "results.md", "results.png"} <= {p.name for p in tmp_path.iterdir()}

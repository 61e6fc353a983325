"""``import ocd_hf`` and ``ocd-hf --help`` stay light; every public name still imports; saved generators load
through ``AutoModel`` in a fresh process (the model classes register when their first config is built)."""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_DENOISER, text_batch, tiny_bert
from helpers.d2nwg import tiny_d2nwg
from helpers.mcdi import tiny_generator

import ocd_hf
from ocd_hf.methods import d2nwg, mcdi, ocd

HEAVY = ("diffusers", "datasets", "matplotlib", "sklearn", "setfit", "sentence_transformers")
PACKAGES = [ocd_hf, ocd, mcdi, d2nwg]


def run_fresh(code: str) -> str:
    """Run ``code`` in a fresh interpreter; its last line of output."""
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed.stdout.strip().splitlines()[-1]


def test_import_ocd_hf_and_cli_help_import_no_heavy_library():
    code = f"""
import contextlib, io, json, sys
# What transformers' Auto classes import themselves (older releases import scikit-learn) is not ours to avoid.
from transformers import AutoConfig, AutoModel, AutoModelForImageClassification, AutoModelForSequenceClassification
unavoidable = {{m for m in {HEAVY!r} if m in sys.modules}}
import ocd_hf
after_import = sorted(m for m in {HEAVY!r} if m in sys.modules and m not in unavoidable)
from ocd_hf.cli import main
for argv in (["--help"], ["train", "--help"], ["harvest", "--help"]):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        main(argv)
print(json.dumps([after_import, sorted(m for m in {HEAVY!r} if m in sys.modules and m not in unavoidable)]))
"""
    after_import, after_help = json.loads(run_fresh(code))
    assert after_import == [], "import ocd_hf"
    assert after_help == [], "ocd-hf --help"


def type_checking_names(package) -> dict[str, str]:
    """The names the ``if TYPE_CHECKING:`` block of ``package``'s ``__init__`` imports, with their module."""
    tree = ast.parse(Path(package.__file__).read_text(encoding="utf-8"))
    block = next(node for node in tree.body if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING")
    return {alias.name: "." * node.level + node.module for node in block.body for alias in node.names}


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.__name__)
def test_lazy_structure_matches_type_checking_imports_and_all(package):
    structure = {name: module for module, names in package._IMPORT_STRUCTURE.items() for name in names}
    assert structure == type_checking_names(package)
    eager = {name for name in package.__all__ if name in vars(package)} - set(structure)
    assert set(package.__all__) == set(structure) | eager
    assert set(package.__all__) <= set(dir(package))


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.__name__)
def test_every_public_name_resolves_to_its_module_object(package):
    for module, names in package._IMPORT_STRUCTURE.items():
        source = importlib.import_module(module, package.__name__)
        for name in names:
            assert getattr(package, name) is getattr(source, name), f"{package.__name__}.{name}"
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        package.not_a_name  # noqa: B018


def test_sampling_schedulers_are_diffusers_ddpm_compatible_schedulers_less_edm():
    from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers

    from ocd_hf.methods.ocd.configuration import SAMPLING_SCHEDULERS

    assert SAMPLING_SCHEDULERS == tuple(s.name for s in KarrasDiffusionSchedulers if s.name != "EDMEulerScheduler")


def test_auto_model_loads_saved_generators_in_a_fresh_process(tmp_path):
    backbone, inputs = tiny_bert(), text_batch()
    backbone.save_pretrained(tmp_path / "backbone")
    ocd_model = ocd_hf.OCDWrapper.attach(
        backbone, "classifier", example_inputs=inputs, denoiser_config=TINY_DENOISER,
        base_model_name_or_path=str(tmp_path / "backbone"),
    )
    ocd_model.save_pretrained(tmp_path / "ocd")
    tiny_generator().save_pretrained(tmp_path / "mcdi")
    tiny_d2nwg().save_pretrained(tmp_path / "d2nwg")
    code = f"""
import json, sys
import ocd_hf
from transformers import AutoModel, AutoModelForSequenceClassification
print(json.dumps([
    type(AutoModel.from_pretrained({str(tmp_path / "ocd")!r})).__name__,
    type(AutoModelForSequenceClassification.from_pretrained({str(tmp_path / "ocd")!r})).__name__,
    type(AutoModel.from_pretrained({str(tmp_path / "mcdi")!r})).__name__,
    type(AutoModel.from_pretrained({str(tmp_path / "d2nwg")!r})).__name__,
]))
"""
    assert json.loads(run_fresh(code)) == ["OCDWrapper", "OCDWrapper", "McDiHeadGenerator", "D2NWGHeadGenerator"]

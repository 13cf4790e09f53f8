"""Never destroy what the user owns: each case is refused before any work, and the victim is byte-identical after."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict

import pytest
import torch
import yaml
from conftest import write_jsonl
from mergekit.options import MergeOptions

from mergekit_fisher_mask import CalibrationSettings, calibrate, calibrate_full
from mergekit_fisher_mask.errors import OutputPathError
from mergekit_fisher_mask.outputs import _HOST, remove_stale_staging, staged_folder
from mergekit_fisher_mask.pipeline import MARKER, run_fisher_merge

OPTIONS = MergeOptions(quiet=True)
SETTINGS = CalibrationSettings(samples=8, batch_size=4)


def snapshot(path: Path) -> Dict[str, bytes]:
    """Every file under ``path`` (hidden ones too) with its bytes; a file maps its own name."""
    path = Path(path)
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def user_folder(path: Path) -> Path:
    (path / "sub").mkdir(parents=True)
    (path / "thesis.txt").write_text("four years of work")
    (path / "sub" / "data.csv").write_text("a,b\n1,2\n")
    (path / ".hidden").write_text("secret")
    return path


@pytest.fixture
def setup(model_zoo, text_data, tmp_path):
    """Two BERT classifiers (copied, so tests may put things next to them), their Fisher files, and a recipe."""
    models = []
    for seed in (1, 2):
        models.append(tmp_path / "models" / f"m{seed}")
        shutil.copytree(model_zoo("bert", seed=seed), models[-1])
    fishers = [tmp_path / f"f{i}.safetensors" for i in range(2)]
    for model, fisher in zip(models, fishers):
        calibrate(str(model), str(text_data), fisher, SETTINGS, progress=False)
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(yaml.safe_dump({
        "merge_method": "fisher_mask",
        "base_model": str(models[0]),
        "models": [{"model": str(m), "parameters": {"fisher": str(f)}} for m, f in zip(models, fishers)],
    }))
    return models, fishers, recipe


def refused(tmp_path, victim: Path, action, match: str) -> None:
    before = snapshot(victim)
    with pytest.raises(OutputPathError, match=match):
        action()
    assert snapshot(victim) == before, "the victim's files must be byte-identical"
    assert not [p for p in tmp_path.rglob(".*partial*")], "no staging file or folder may be left behind"


def test_overwrite_never_replaces_a_folder_this_tool_did_not_write(setup, tmp_path):
    _, _, recipe = setup
    mine = user_folder(tmp_path / "mine")
    merge = lambda: run_fisher_merge(str(recipe), str(mine), OPTIONS, overwrite=True)  # noqa: E731
    refused(tmp_path, mine, merge, r"holds files this tool did not write \(\.hidden, sub/, thesis\.txt\)")


def test_overwrite_replaces_a_previous_merge(setup, tmp_path):
    _, _, recipe = setup
    out = tmp_path / "out"
    run_fisher_merge(str(recipe), str(out), OPTIONS)
    with pytest.raises(OutputPathError, match="already holds a previous merge. Pass overwrite=True"):
        run_fisher_merge(str(recipe), str(out), OPTIONS)
    before = snapshot(out)
    run_fisher_merge(str(recipe), str(out), OPTIONS, overwrite=True)
    assert (out / MARKER).is_file() and set(snapshot(out)) == set(before)


def test_overwrite_keeps_a_previous_merge_the_user_added_files_to(setup, tmp_path):
    _, _, recipe = setup
    out = tmp_path / "out"
    run_fisher_merge(str(recipe), str(out), OPTIONS)
    (out / "eval").mkdir()
    (out / "eval" / "results.json").write_text("{}")
    merge = lambda: run_fisher_merge(str(recipe), str(out), OPTIONS, overwrite=True)  # noqa: E731
    refused(tmp_path, out, merge, r"holds a previous merge plus files this tool did not write \(eval/results\.json\)")


def test_a_folder_that_appears_at_the_output_during_the_merge_is_kept(setup, tmp_path, monkeypatch):
    """The output check runs again just before the result is moved into place."""
    import mergekit_fisher_mask.pipeline as pipeline

    _, _, recipe = setup
    out = tmp_path / "out"
    write_card = pipeline.write_model_card

    def user_creates_the_folder_meanwhile(*args, **kwargs):
        write_card(*args, **kwargs)
        user_folder(out)

    monkeypatch.setattr(pipeline, "write_model_card", user_creates_the_folder_meanwhile)
    with pytest.raises(OutputPathError, match="holds files this tool did not write"):
        run_fisher_merge(str(recipe), str(out), OPTIONS, overwrite=True)
    assert snapshot(out) == snapshot(user_folder(tmp_path / "same-as-user")), "the user's files are untouched"
    assert not [p for p in tmp_path.rglob(".*partial*")]


@pytest.mark.parametrize("where", ["model", "parent of model", "inside model", "fisher file", "parent of fisher"])
def test_output_may_not_touch_an_input(setup, tmp_path, where):
    models, fishers, recipe = setup
    out, victim, match = {
        "model": (models[1], models[1], "is input model"),
        "parent of model": (models[1].parent, models[1].parent, "contains input model"),
        "inside model": (models[0] / "merged", models[0], "lies inside input model"),
        "fisher file": (fishers[0], fishers[0], "is the mask-Fisher file"),
        "parent of fisher": (tmp_path, fishers[0], "contains"),
    }[where]
    refused(tmp_path, victim, lambda: run_fisher_merge(str(recipe), str(out), OPTIONS, overwrite=True), match)


def test_output_may_not_contain_the_calibration_data(model_zoo, text_data, tmp_path):
    data = tmp_path / "data" / "train.jsonl"
    data.parent.mkdir()
    shutil.copy(text_data, data)
    recipe = tmp_path / "recipe.yml"
    models = [model_zoo("bert", seed=s) for s in (1, 2)]
    recipe.write_text(yaml.safe_dump({
        "merge_method": "fisher_mask", "base_model": str(models[0]),
        "models": [{"model": str(m), "parameters": {"calibration_data": str(data)}} for m in models],
    }))
    merge = lambda: run_fisher_merge(str(recipe), str(data.parent), OPTIONS, overwrite=True)  # noqa: E731
    refused(tmp_path, data.parent, merge, "contains the calibration data")


def test_calibrate_out_inside_the_model_folder_is_refused(setup, text_data, tmp_path):
    models, _, _ = setup
    weights = models[0] / "model.safetensors"
    for overwrite in (False, True):
        action = lambda: calibrate(str(models[0]), str(text_data), weights, SETTINGS, overwrite=overwrite)  # noqa: E731
        refused(tmp_path, models[0], action, "lies inside the model folder")


def test_calibrate_never_replaces_a_file_that_is_not_its_own(setup, text_data, tmp_path):
    models, fishers, _ = setup
    notes = tmp_path / "notes.safetensors"
    notes.write_text("not a Fisher file")
    action = lambda: calibrate(str(models[0]), str(text_data), notes, SETTINGS, overwrite=True)  # noqa: E731
    refused(tmp_path, notes, action, "is not a mask-Fisher file")
    # The data file itself is no exception.
    data_copy = tmp_path / "train.jsonl"
    shutil.copy(text_data, data_copy)
    action = lambda: calibrate(str(models[0]), str(data_copy), data_copy, SETTINGS, overwrite=True)  # noqa: E731
    refused(tmp_path, data_copy, action, "is not a mask-Fisher file")


def test_replacing_a_fisher_file_needs_overwrite(setup, text_data, tmp_path):
    models, fishers, _ = setup
    action = lambda: calibrate(str(models[1]), str(text_data), fishers[0], SETTINGS)  # noqa: E731
    refused(tmp_path, fishers[0], action, "already holds a mask-Fisher file. Pass overwrite=True")
    replaced = calibrate(str(models[1]), str(text_data), fishers[0], SETTINGS, overwrite=True, progress=False)
    assert replaced.model == str(models[1])


def test_calibrate_out_that_is_a_folder(setup, text_data, tmp_path):
    models, _, _ = setup
    folder = user_folder(tmp_path / "results")
    action = lambda: calibrate(str(models[0]), str(text_data), folder, SETTINGS)  # noqa: E731
    refused(tmp_path, folder, action, "is a folder; give the path of the file to write")
    # --full writes a folder: a user's folder is refused too, even with --overwrite.
    action = lambda: calibrate_full(str(models[0]), str(text_data), folder, SETTINGS, overwrite=True)  # noqa: E731
    refused(tmp_path, folder, action, "holds files this tool did not write")


def test_full_fisher_folder_is_replaced_only_with_overwrite(setup, text_data, tmp_path):
    models, _, _ = setup
    out = tmp_path / "full"
    calibrate_full(str(models[0]), str(text_data), out, SETTINGS, progress=False)
    action = lambda: calibrate_full(str(models[0]), str(text_data), out, SETTINGS)  # noqa: E731
    refused(tmp_path, out, action, "already holds a full Fisher. Pass overwrite=True")
    calibrate_full(str(models[1]), str(text_data), out, SETTINGS, overwrite=True, progress=False)
    assert not [p for p in tmp_path.rglob(".*partial*")]
    (out / "notes.txt").write_text("mine")  # a file the user added makes the folder theirs too
    action = lambda: calibrate_full(str(models[0]), str(text_data), out, SETTINGS, overwrite=True)  # noqa: E731
    refused(tmp_path, out, action, r"holds a full Fisher plus files this tool did not write \(notes\.txt\)")


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_leftovers_of_a_killed_run_are_removed_by_the_next(setup, tmp_path):
    _, _, recipe = setup
    out = tmp_path / "out"
    dead = tmp_path / f".out.partial-{_HOST}-{_dead_pid()}-0123abcd"
    alive = tmp_path / f".out.partial-{_HOST}-{os.getpid()}-4567cdef"
    other_host = tmp_path / f".out.partial-00000000-{_dead_pid()}-89abcdef"
    for folder in (dead, alive, other_host):
        folder.mkdir()
        (folder / "model-00001-of-00002.safetensors").write_bytes(b"\0" * 1000)
    lookalike = user_folder(tmp_path / ".out.partial-mine")  # not our name pattern: never touched
    before = snapshot(lookalike)
    run_fisher_merge(str(recipe), str(out), OPTIONS)
    assert not dead.exists(), "a dead run's staging folder is removed"
    assert alive.exists() and other_host.exists(), "a live run's (or another host's) staging is left alone"
    assert snapshot(lookalike) == before


def test_a_killed_merge_leaves_only_what_the_next_run_cleans(setup, tmp_path):
    """Kill -9 during a merge (simulated by a child process that exits inside the staging block)."""
    out = tmp_path / "out"
    code = (
        "import os, sys\n"
        "from mergekit_fisher_mask.outputs import staged_folder\n"
        f"with staged_folder({str(out)!r}) as s:\n"
        "    (s / 'model-00001.safetensors').write_bytes(b'x' * 100)\n"
        "    os._exit(9)\n"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 9
    leftovers = list(tmp_path.glob(".out.partial-*"))
    assert len(leftovers) == 1 and not out.exists()
    assert remove_stale_staging(out) == 1 and not list(tmp_path.glob(".out.partial-*"))
    with staged_folder(out):  # and a new run starts clean
        pass


def test_merge_refuses_before_calibrating(model_zoo, text_data, tmp_path, monkeypatch):
    """A refused output costs no calibration: the check runs first."""
    import mergekit_fisher_mask.cache as cache

    monkeypatch.setattr(cache, "measure_statistic", lambda *a, **k: pytest.fail("calibrated before refusing"))
    models = [model_zoo("bert", seed=s) for s in (1, 2)]
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "w1 w2", "label": 0}])
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(yaml.safe_dump({
        "merge_method": "fisher_mask", "base_model": str(models[0]),
        "models": [{"model": str(m), "parameters": {"calibration_data": str(data)}} for m in models],
    }))
    mine = user_folder(tmp_path / "mine")
    refused(tmp_path, mine, lambda: run_fisher_merge(str(recipe), str(mine), OPTIONS, overwrite=True), "did not write")


def test_a_symlinked_alias_of_an_input_is_refused(setup, text_data, tmp_path):
    models, _, recipe = setup
    (tmp_path / "alias").symlink_to(tmp_path, target_is_directory=True)
    for out, match in ((tmp_path / "alias" / "models" / "m2", "is input model"),
                       (tmp_path / "alias" / "models" / "m1" / "merged", "lies inside input model")):
        refused(tmp_path, models[0].parent, lambda: run_fisher_merge(str(recipe), str(out), OPTIONS, overwrite=True),
                match)
    out = tmp_path / "alias" / "models" / "m1" / "new.safetensors"
    refused(tmp_path, models[0], lambda: calibrate(str(models[0]), str(text_data), out, SETTINGS), "lies inside")


@pytest.mark.parametrize("marker", ["{}", '{"method": "fisher_mask"}', '{"files": "model.safetensors"}', "not json"])
def test_a_marker_without_a_file_list_vouches_for_nothing(setup, tmp_path, marker):
    """Only a marker that lists the merge's files vouches for them (a marker without one was never released)."""
    _, _, recipe = setup
    out = tmp_path / "old"
    out.mkdir()
    (out / MARKER).write_text(marker)
    (out / "model.safetensors").write_bytes(b"old weights")
    merge = lambda: run_fisher_merge(str(recipe), str(out), OPTIONS, overwrite=True)  # noqa: E731
    refused(tmp_path, out, merge, r"holds files this tool did not write \(fisher_merge\.json, model\.safetensors\)")


def test_a_merge_the_user_added_files_to_is_kept(setup, tmp_path):
    _, _, recipe = setup
    out = tmp_path / "merged"
    run_fisher_merge(str(recipe), str(out), OPTIONS)
    (out / "eval").mkdir()
    (out / "eval" / "results.json").write_text("{}")
    merge = lambda: run_fisher_merge(str(recipe), str(out), OPTIONS, overwrite=True)  # noqa: E731
    refused(tmp_path, out, merge, r"holds a previous merge plus files this tool did not write \(eval/results\.json\)")
    (out / "eval" / "results.json").unlink()
    (out / "eval").rmdir()
    run_fisher_merge(str(recipe), str(out), OPTIONS, overwrite=True)
    assert json.loads((out / MARKER).read_text())["files"]


def test_an_output_under_a_file_is_refused_before_any_work(setup, text_data, tmp_path, monkeypatch):
    import importlib

    api = importlib.import_module("mergekit_fisher_mask.calibration.api")  # the package's `calibrate` is the function
    models, _, recipe = setup
    (tmp_path / "afile.txt").write_text("mine")
    monkeypatch.setattr(api, "prepare_calibration", lambda *a, **k: pytest.fail("worked before refusing"))
    refused(tmp_path, tmp_path / "afile.txt", lambda: calibrate(str(models[0]), str(text_data),
                                                                 tmp_path / "afile.txt" / "x.safetensors"), "is a file")
    refused(tmp_path, tmp_path / "afile.txt",
            lambda: run_fisher_merge(str(recipe), str(tmp_path / "afile.txt" / "x"), OPTIONS), "is a file")


@pytest.mark.parametrize("overwrite", [True, False])
def test_a_fisher_file_written_meanwhile_is_replaced_only_with_overwrite(setup, tmp_path, overwrite):
    """The Fisher cache calibrates with overwrite: two merges filling one key write the same result."""
    from mergekit_fisher_mask import load_mask_fisher, save_mask_fisher
    from mergekit_fisher_mask.files import MaskFisher, is_mask_fisher_file
    from mergekit_fisher_mask.outputs import check_replaceable

    _, fishers, _ = setup
    fisher = load_mask_fisher(fishers[0])
    out = tmp_path / "cache" / "key.safetensors"
    claim = check_replaceable(out, MaskFisher.OUTPUT, overwrite=overwrite)
    out.parent.mkdir()
    shutil.copy(fishers[1], out)  # another run finished first
    if overwrite:
        save_mask_fisher(fisher, out, claim)
        assert out.read_bytes() != fishers[1].read_bytes() and is_mask_fisher_file(out)
    else:
        refused(tmp_path, out, lambda: save_mask_fisher(fisher, out, claim), "While this run was working")


def test_saving_without_a_claim_replaces_only_our_own_files(setup, tmp_path):
    """The public save functions, called without a claim, never replace a user's file or folder."""
    from mergekit_fisher_mask import load_mask_fisher, save_mask_fisher
    from mergekit_fisher_mask.files import FullFisher

    _, fishers, _ = setup
    fisher = load_mask_fisher(fishers[0])
    thesis = tmp_path / "thesis.txt"
    thesis.write_text("four years of work")
    refused(tmp_path, thesis, lambda: save_mask_fisher(fisher, thesis), "is not a mask-Fisher file")
    mine = user_folder(tmp_path / "mine")
    full = FullFisher(shape=fisher.shape, tensors={"w": torch.ones(2)})
    refused(tmp_path, mine, lambda: full.save(mine), "holds files this tool did not write")
    save_mask_fisher(fisher, fishers[1])  # a Fisher file of this tool is replaced
    saved = load_mask_fisher(fishers[1])
    assert all(torch.equal(saved.groups[key], fisher.groups[key]) for key in fisher.groups)

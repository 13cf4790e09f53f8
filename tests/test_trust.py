"""Trust, round 3: the path checked is the path written, write failures are one line before any work, and inputs
that look valid do not crash or mislead. Each data-loss case asserts the victim's bytes afterwards; each "before
any work" case asserts that no calibration ran (no cache entry, no staging file, and the pass was never called)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from conftest import write_jsonl
from test_safety import OPTIONS, SETTINGS, refused, setup, snapshot, user_folder  # noqa: F401 (fixture)

import mergekit_fisher_mask.cache as cache_module
import mergekit_fisher_mask.calibration.api as api
from mergekit_fisher_mask import CalibrationSettings, calibrate, calibrate_full
from mergekit_fisher_mask.cli import main
from mergekit_fisher_mask.errors import CalibrationDataError, OutputPathError, RecipeError, SettingsError
from mergekit_fisher_mask.pipeline import run_fisher_merge


def cli(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if any calibration pass or merge starts."""
    monkeypatch.setattr(api, "load_calibration", lambda *a, **k: pytest.fail("a calibration started"))
    monkeypatch.setattr(cache_module, "measure_statistic", lambda *a, **k: pytest.fail("a calibration started"))
    monkeypatch.setattr("mergekit.merge.run_merge", lambda *a, **k: pytest.fail("a merge started"))


# --------------------------------------------------------------------------------------------------------------
# 1. A literal ~ is the user's home, for every check and every write
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture
def home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)  # a ./~ here would be the wrong place
    return home


def test_a_literal_tilde_output_of_merge_is_checked_where_it_is_written(setup, home, tmp_path):
    _, _, recipe = setup
    mydata = user_folder(home / "mydata")
    result = cli("merge", recipe, "~/mydata", "--overwrite")
    before = snapshot(mydata)
    assert "holds files this tool did not write" in str(result.exception) and str(mydata) in str(result.exception)
    assert snapshot(mydata) == before and not (tmp_path / "~").exists()


def test_a_literal_tilde_out_of_calibrate_is_checked_where_it_is_written(setup, home, tmp_path, text_data):
    models, _, _ = setup
    notes = home / "notes.safetensors"
    notes.write_bytes(b"my notes, not a Fisher file")
    result = cli("calibrate", models[0], "--data", text_data, "--out=~/notes.safetensors", "--overwrite", "--quiet")
    assert "is not a mask-Fisher file" in str(result.exception)
    assert notes.read_bytes() == b"my notes, not a Fisher file" and not (tmp_path / "~").exists()
    result = cli("calibrate", models[0], "--data", text_data, "--out=~/new.safetensors", "--samples", 4, "--quiet")
    assert result.exit_code == 0, result.output
    assert (home / "new.safetensors").is_file() and not (tmp_path / "~").exists()


def test_a_literal_tilde_plot_is_checked_where_it_is_written(setup, home, tmp_path):
    pytest.importorskip("matplotlib")
    _, fishers, _ = setup
    figure = home / "fig.png"
    figure.write_bytes(b"\x89PNG\r\n\x1a\n my figure")
    result = cli("inspect", fishers[0], "--plot=~/fig.png")
    assert "already holds a PNG image. Pass --overwrite" in str(result.exception)
    assert figure.read_bytes() == b"\x89PNG\r\n\x1a\n my figure" and not (tmp_path / "~").exists()


def test_the_python_api_expands_tilde_once_too(setup, home, text_data):
    models, _, _ = setup
    fisher = calibrate(str(models[0]), str(text_data), "~/api.safetensors", SETTINGS, progress=False)
    assert (home / "api.safetensors").is_file() and fisher.samples == 8


# --------------------------------------------------------------------------------------------------------------
# 2. Disks that refuse: one line before any work, or at write time with nothing left behind
# --------------------------------------------------------------------------------------------------------------


@contextmanager
def mounted(folder: Path, size: str, read_only: bool = False):
    """A tmpfs of ``size`` at ``folder`` (root only); read-only after ``prepare`` files are in place."""
    folder.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("needs root to mount a tmpfs")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def read_only(folder: Path) -> None:
    assert subprocess.run(["mount", "-o", "remount,ro", str(folder)], capture_output=True).returncode == 0


def test_a_read_only_disk_is_refused_before_any_work(setup, tmp_path, text_data, no_work):
    models, fishers, recipe = setup
    with mounted(tmp_path / "ro", "1m") as disk:
        (disk / "kept.txt").write_text("mine")
        read_only(disk)
        before = snapshot(disk)
        cases = {
            "calibrate": ("calibrate", models[0], "--data", text_data, "--out", disk / "f.safetensors"),
            "calibrate --full": ("calibrate", models[0], "--data", text_data, "--out", disk / "full", "--full"),
            "merge": ("merge", recipe, disk / "merged"),
            "inspect --plot": ("inspect", fishers[0], "--plot", disk / "fig.png"),
        }
        for name, args in cases.items():
            result = cli(*args)
            message = str(result.exception)
            assert result.exit_code != 0 and "cannot be written" in message and "Read-only file system" in message, (
                name, message)
        calibrating = tmp_path / "calibrating.yml"
        calibrating.write_text(yaml.safe_dump({
            "merge_method": "fisher_mask", "base_model": str(models[0]),
            "models": [{"model": str(m), "parameters": {"calibration_data": str(text_data)}} for m in models],
        }))
        result = cli("merge", calibrating, tmp_path / "merged", "--fisher-cache", disk / "cache")
        assert "--fisher-cache" in str(result.exception) and "Read-only file system" in str(result.exception)
        assert snapshot(disk) == before
    assert not (tmp_path / "merged").exists()


def test_a_full_disk_at_write_time_is_one_line_and_leaves_nothing(setup, tmp_path, text_data):
    models, _, _ = setup
    with mounted(tmp_path / "full", "4k") as disk:
        victim = disk / "kept.bin"
        victim.write_bytes(os.urandom(3500))  # the probe's empty file still fits; a 2 kB Fisher file does not
        with pytest.raises(OutputPathError, match=r"Cannot write .*f\.safetensors: No space left on device"):
            calibrate(str(models[0]), str(text_data), disk / "f.safetensors", SETTINGS, progress=False)
        assert sorted(p.name for p in disk.iterdir()) == ["kept.bin"] and len(victim.read_bytes()) == 3500


def test_a_merge_without_room_is_refused_before_any_work(setup, tmp_path, no_work):
    _, _, recipe = setup
    with mounted(tmp_path / "small", "64k") as disk:
        result = cli("merge", recipe, disk / "merged")
        assert "needs about" in str(result.exception) and "free" in str(result.exception)
        assert not list(disk.iterdir())


def test_ctrl_c_while_the_command_starts_is_quiet():
    """Interrupts during the seconds of imports end with status 130 and one line, never a traceback."""
    script = Path(sys.executable).with_name("mergekit-fisher")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "mergekit_fisher_mask"]
    interrupted = 0
    for delay in (0.3, 0.8, 1.5):
        process = subprocess.Popen(command + ["merge", "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
        time.sleep(delay)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
        assert "Traceback" not in stderr, (delay, stderr)
        assert process.returncode in (0, 130), (delay, process.returncode, stderr)
        interrupted += process.returncode == 130
    assert interrupted, "no run was interrupted while starting; the test proves nothing"


def test_the_current_folder_is_never_replaced(setup, tmp_path, monkeypatch):
    _, _, recipe = setup
    out = tmp_path / "merged"
    run_fisher_merge(str(recipe), str(out), OPTIONS)
    before = snapshot(out)
    monkeypatch.chdir(out)
    result = cli("merge", recipe, ".", "--overwrite")
    assert "is the current folder of this command" in str(result.exception)
    (out / "sub").mkdir()
    monkeypatch.chdir(out / "sub")
    result = cli("merge", recipe, "..", "--overwrite")
    assert "a folder above the current folder of this command" in str(result.exception)
    assert Path(os.getcwd()) == out / "sub", "the shell's folder still exists"
    monkeypatch.chdir(tmp_path)
    (out / "sub").rmdir()
    assert snapshot(out) == before


# --------------------------------------------------------------------------------------------------------------
# 3. Valid-looking input that crashed or was silently changed
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_every_device_map_runs_on_a_cpu_and_equals_no_map(arch, model_zoo, tmp_path):
    from conftest import assert_close, data_for

    model, data = model_zoo(arch), data_for(arch, tmp_path)
    plain = calibrate(str(model), str(data), tmp_path / "plain.safetensors", SETTINGS, progress=False)
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"": "cpu"}))
    for device_map in ("auto", "balanced", "balanced_low_0", "sequential", str(mapping)):
        for memory in (None, "cpu=10GiB"):
            settings = CalibrationSettings(samples=8, batch_size=4, device_map=device_map, max_memory=memory)
            out = tmp_path / f"{Path(device_map).stem}-{memory}.safetensors"
            mapped = calibrate(str(model), str(data), out, settings, progress=False)
            for key in plain.groups:
                assert_close(mapped.groups[key], plain.groups[key])


@pytest.mark.parametrize("arch, pairs, minimum", [("bert", False, 3), ("llama", False, 2)])
def test_a_max_length_below_the_special_tokens_is_refused(arch, pairs, minimum, model_zoo, tmp_path, no_work):
    from conftest import data_for

    settings = CalibrationSettings(samples=4, max_length=minimum - 1)
    with pytest.raises(SettingsError, match=rf"max_length {minimum - 1} leaves no room.*Use max_length {minimum} or more"):
        calibrate(str(model_zoo(arch)), str(data_for(arch, tmp_path)), tmp_path / "f.safetensors", settings)
    result = cli("calibrate", model_zoo(arch), "--data", data_for(arch, tmp_path), "--out", tmp_path / "g.safetensors",
                 "--max-length", minimum - 1)
    assert f"Use --max-length {minimum} or more" in str(result.exception)


def test_a_refused_max_length_is_not_preceded_by_a_data_size_warning(model_zoo, text_data, tmp_path, no_work, caplog):
    settings = CalibrationSettings(samples=1000, max_length=2)  # more samples than the data has, and too short
    with caplog.at_level(logging.WARNING), pytest.raises(SettingsError, match="max_length 2 leaves no room"):
        calibrate(str(model_zoo("bert")), str(text_data), tmp_path / "f.safetensors", settings)
    assert "usable examples" not in caplog.text, caplog.text


def test_the_recorded_max_length_is_the_one_used(model_zoo, tmp_path):
    from conftest import data_for

    fisher = calibrate(str(model_zoo("bert")), str(data_for("bert", tmp_path)), tmp_path / "f.safetensors",
                       CalibrationSettings(samples=4, max_length=3), progress=False)
    assert fisher.data["max_length"] == 3 and fisher.data["settings"]["max_length"] == 3


@pytest.mark.parametrize("parameters, match", [({"sparsify": "magnitude", "density": 0.5}, "sparsify: magnitude"),
                                              ({"uncovered": "base"}, "uncovered: base")])
def test_task_vector_options_need_an_explicit_base_model(setup, tmp_path, parameters, match, no_work):
    models, fishers, _ = setup
    recipe = tmp_path / "no-base.yml"
    recipe.write_text(yaml.safe_dump({
        "merge_method": "fisher_mask", "parameters": parameters,
        "models": [{"model": str(m), "parameters": {"fisher": str(f)}} for m, f in zip(models, fishers)],
    }))
    with pytest.raises(RecipeError, match=rf"{match} works on the models' changes from a base model.*no base_model"):
        run_fisher_merge(str(recipe), str(tmp_path / "out"), OPTIONS)


def test_pythia_style_models_merge_with_linear_too(model_zoo, tmp_path):
    """mergekit 0.1.5's own GPT-NeoX definition needs buffers transformers 5 does not save; the plugin corrects it
    for every method run through `mergekit-fisher merge`."""
    from transformers import AutoModelForCausalLM

    models = [model_zoo("gpt_neox-lm", seed=s) for s in (1, 2)]
    recipe = tmp_path / "linear.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "base_model": str(models[0]), "dtype": "float32",
                                      "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in models]}))
    run_fisher_merge(str(recipe), str(tmp_path / "out"), OPTIONS)
    _, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


# --------------------------------------------------------------------------------------------------------------
# 4. Messages that mislead
# --------------------------------------------------------------------------------------------------------------


def test_duplicate_models_follow_the_loading_rule_from_any_recipe_folder(setup, tmp_path, monkeypatch):
    models, fishers, _ = setup
    monkeypatch.chdir(tmp_path)
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "alias").symlink_to(models[0], target_is_directory=True)
    body = {"merge_method": "linear", "models": [{"model": "models/m1"}, {"model": "links/alias"}]}
    for folder in (tmp_path, tmp_path / "links", tmp_path / "models"):
        recipe = folder / "dup.yml"
        recipe.write_text(yaml.safe_dump(body))
        with pytest.raises(RecipeError, match=r"'links/alias' is listed twice \(as 'models/m1'\)"):
            run_fisher_merge(str(recipe), str(tmp_path / "out"), OPTIONS)


def test_a_model_path_that_is_not_found_names_the_rule_and_the_likely_path(setup, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path / "models")
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear",
                                      "models": [{"model": "models/m1"}, {"model": "../../nowhere/m2"}]}))
    with pytest.raises(RecipeError, match=rf"resolved against the current folder {tmp_path / 'models'}.*Did you mean "
                                          rf"{tmp_path / 'models' / 'm1'}"):
        run_fisher_merge(str(recipe), str(tmp_path / "out"), OPTIONS)
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": "m1"}, {"model": "../../nowhere/m2"}]}))
    with pytest.raises(RecipeError, match=r"'../../nowhere/m2' does not exist .*resolved against the current folder"):
        run_fisher_merge(str(recipe), str(tmp_path / "out"), OPTIONS)


def test_every_calibration_is_checked_before_the_first_runs(setup, tmp_path, text_data, no_work):
    models, _, _ = setup
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "fisher_mask", "base_model": str(models[0]), "models": [
        {"model": str(models[0]), "parameters": {"calibration_data": str(text_data)}},
        {"model": str(models[1]), "parameters": {"calibration_data": "missing.jsonl"}},
    ]}))
    start = time.perf_counter()
    with pytest.raises(CalibrationDataError, match="missing.jsonl does not exist"):
        run_fisher_merge(str(recipe), str(tmp_path / "out"), OPTIONS, cache_dir=tmp_path / "cache")
    assert time.perf_counter() - start < 30
    assert not list((tmp_path / "cache").glob("*")) if (tmp_path / "cache").exists() else True
    assert not list(tmp_path.rglob(".*partial*"))


def test_a_cache_inside_a_model_folder_names_the_option_given(setup, tmp_path, text_data, no_work):
    models, _, _ = setup
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "fisher_mask", "base_model": str(models[0]), "models": [
        {"model": str(m), "parameters": {"calibration_data": str(text_data)}} for m in models]}))
    before = snapshot(models[0])
    result = cli("merge", recipe, tmp_path / "out", "--fisher-cache", models[0] / "cache")
    assert str(result.exception).startswith("The --fisher-cache ") and "lies inside input model" in str(result.exception)
    assert snapshot(models[0]) == before


def test_skipped_rows_are_counted_with_their_reason(model_zoo, tmp_path, caplog):
    rows = [{"text": "w1 w2", "label": 0}] * 4 + [{"label": 1}] * 3 + [{"text": 42, "label": 0}] * 2
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    with caplog.at_level("WARNING"):
        calibrate(str(model_zoo("bert")), str(data), tmp_path / "f.safetensors",
                  CalibrationSettings(samples=32, batch_size=4), progress=False)
    assert ("has only 4 usable examples; 32 were asked for (5 row(s) skipped: 3 with no value in 'text'" in caplog.text
            and "2 with a number, not text, in 'text'" in caplog.text)
    numbers = write_jsonl(tmp_path / "n.jsonl", [{"text": 7, "label": 0}] * 3)
    with pytest.raises(CalibrationDataError, match=r"no usable example .* 3 with a number, not text, in 'text'"):
        calibrate(str(model_zoo("bert")), str(numbers), tmp_path / "g.safetensors", SETTINGS)


def test_a_header_only_csv_holds_no_rows(model_zoo, tmp_path):
    data = tmp_path / "d.csv"
    data.write_text("text,label\n")
    with pytest.raises(CalibrationDataError, match=r"d\.csv cannot be read as csv: it holds no rows"):
        calibrate(str(model_zoo("bert")), str(data), tmp_path / "f.safetensors", SETTINGS)


def test_options_the_task_does_not_read_are_refused(model_zoo, text_data, tmp_path, no_work):
    with pytest.raises(SettingsError, match="label_column names the labels of a classifier.*causal_lm model"):
        calibrate(str(model_zoo("llama")), str(text_data), tmp_path / "f.safetensors",
                  CalibrationSettings(label_column="label"))
    result = cli("calibrate", model_zoo("bert"), "--data", text_data, "--out", tmp_path / "f.safetensors",
                 "--target-column", "summary")
    assert "--target-column names a sequence-to-sequence model's targets" in str(result.exception)


def test_messages_spell_options_as_the_user_gave_them(setup, tmp_path, text_data):
    models, fishers, _ = setup
    with pytest.raises(OutputPathError, match="Pass overwrite=True to replace it"):
        calibrate(str(models[0]), str(text_data), fishers[0], SETTINGS)
    result = cli("calibrate", models[0], "--data", text_data, "--out", fishers[0])
    assert "Pass --overwrite to replace it" in str(result.exception)


# --------------------------------------------------------------------------------------------------------------
# 5. Reproducible files
# --------------------------------------------------------------------------------------------------------------


def test_identical_calibrations_write_identical_bytes(model_zoo, text_data, tmp_path):
    model = str(model_zoo("bert"))
    for run in ("a", "b"):
        calibrate(model, str(text_data), tmp_path / f"{run}.safetensors", SETTINGS, progress=False)
        calibrate_full(model, str(text_data), tmp_path / f"full-{run}", SETTINGS, progress=False)
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert snapshot(tmp_path / "full-a") == snapshot(tmp_path / "full-b")


def test_a_bad_statistic_file_is_refused_before_another_model_is_calibrated(setup, tmp_path, text_data, no_work):
    models, fishers, _ = setup
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "fisher_mask", "base_model": str(models[0]), "models": [
        {"model": str(models[0]), "parameters": {"fisher": str(fishers[1])}},  # measured on the other model
        {"model": str(models[1]), "parameters": {"calibration_data": str(text_data)}},
    ]}))
    with pytest.raises(Exception, match="measured on a different model"):
        run_fisher_merge(str(recipe), str(tmp_path / "out"), OPTIONS, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())

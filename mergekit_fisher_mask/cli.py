"""The ``mergekit-fisher`` command: ``calibrate`` measures mask Fisher, ``merge`` runs a recipe with the plugin loaded."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click
from mergekit.options import MergeOptions, PrettyPrintHelp, add_merge_options

from .errors import FisherMaskError
from .merge import Normalize  # importing the package registered fisher_mask and fisher with mergekit
from .pipeline import HEAD_POLICIES, run_fisher_merge
from .settings import CalibrationSettings, calibration_options


@click.group()
@click.version_option(package_name="mergekit-fisher-mask")
def main() -> None:
    """Data-aware merging with Fisher Mask Nodes (arXiv 2403.09891) for mergekit."""


@main.command()
@click.argument("model")
@click.option("--data", required=True, help="Local .jsonl/.json/.csv/.parquet/.txt file, or a datasets name[:config][@split].")
@click.option("--out", required=True, type=click.Path(), help="Output .safetensors file (a folder with --full).")
@click.option("--full", is_flag=True, help="Full diagonal Fisher of every parameter (for merge method `fisher`).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it already holds a Fisher of this tool.")
@calibration_options
@click.option("--quiet", is_flag=True, help="No progress bar.")
def calibrate(model, data, out, full, overwrite, settings: CalibrationSettings, quiet) -> None:
    """Measure the Fisher information of MODEL's mask nodes (a local folder or a Hub id) on DATA."""
    from accelerate import PartialState

    from .calibrate.api import calibrate as calibrate_mask
    from .calibrate.api import calibrate_full

    if full:
        fisher, count = calibrate_full(model, data, out, settings, overwrite=overwrite, progress=not quiet)
        if PartialState().is_main_process:
            click.echo(f"Wrote {out}: full Fisher of {len(fisher)} tensors from {count} samples", err=True)
        return
    fisher = calibrate_mask(model, data, out, settings, overwrite=overwrite, progress=not quiet)
    if PartialState().is_main_process:
        click.echo(
            f"Wrote {out}: {fisher.samples} samples, estimator {fisher.estimator}, loss {fisher.loss}, "
            f"dtype {fisher.dtype}, " + ", ".join(f"{key} {tuple(value.shape)}" for key, value in fisher.groups.items()),
            err=True,
        )


@main.command(cls=PrettyPrintHelp)
@click.argument("config_file", type=click.Path(exists=True, dir_okay=False))
@click.argument("out_path", type=click.Path(file_okay=False))
@click.option("--overwrite", is_flag=True, help="Replace OUT_PATH if it already holds a merge.")
@click.option("--heads", type=click.Choice(HEAD_POLICIES), default="auto", show_default=True,
              help="Task heads: take from base_model (base), merge them (merge), or base only when shapes differ (auto).")
@click.option("--verify-fingerprint/--no-verify-fingerprint", default=True, show_default=True,
              help="Refuse a Fisher file measured on different weights than the model it is used with.")
@click.option("--fisher-cache", type=click.Path(file_okay=False), default=None,
              help="Where Fisher files calibrated from `calibration_data` are cached [default: ~/.cache/mergekit-fisher-mask].")
@click.option("--push-to-hub", "push_to_hub", metavar="ORG/NAME", default=None,
              help="Upload the finished merge to this Hub repo (only after the merge fully succeeded).")
@click.option("--private", is_flag=True, help="With --push-to-hub: create the repo as private.")
@add_merge_options
def merge(merge_options: MergeOptions, config_file, out_path, overwrite, heads, verify_fingerprint, fisher_cache,
          push_to_hub, private) -> None:
    """Run the mergekit YAML recipe CONFIG_FILE (any merge method, including fisher_mask and fisher) and write the
    merged model to the folder OUT_PATH.

    Model paths in the recipe are relative to the current folder (as for mergekit-yaml); `fisher` and
    `calibration_data` paths are relative to the recipe's folder, or else to the current folder."""
    from .hub import push_folder, require_token

    if private and not push_to_hub:
        raise FisherMaskError("--private applies to --push-to-hub ORG/NAME; give both, or neither.")
    token = require_token() if push_to_hub else None  # before any work: a missing token must not waste a merge
    merge_options.apply_global_options()
    verbosity = merge_options.verbosity
    logging.getLogger().setLevel(logging.DEBUG if verbosity > 1 else logging.INFO if verbosity else logging.WARNING)
    logging.getLogger("mergekit_fisher_mask").setLevel(logging.INFO)
    run_fisher_merge(
        config_file,
        out_path,
        merge_options,
        overwrite=overwrite,
        verify_fingerprint=verify_fingerprint,
        heads=heads,
        cache_dir=Path(fisher_cache) if fisher_cache else None,
    )
    click.echo(f"Merged model written to {out_path}", err=True)
    if push_to_hub:
        url = push_folder(Path(out_path), push_to_hub, private=private, token=token)
        click.echo(f"Uploaded to {url}", err=True)


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="Write a heatmap PNG (mask-Fisher files).")
@click.option("--overwrite", is_flag=True, help="Let --plot replace an existing PNG image.")
@click.option("--top-k", type=click.IntRange(min=1), default=10, show_default=True,
              help="Heads to list, largest Fisher first.")
@click.option("--normalize", type=click.Choice([n.value for n in Normalize]), default="layer", show_default=True,
              help="Normalization used for the merge-weight panel of --plot (as in the merge).")
def inspect(files, plot, overwrite, top_k, normalize) -> None:
    """Summarize Fisher FILES (mask-Fisher files or full-Fisher folders) and optionally plot them side by side."""
    from .files import load_mask_fisher
    from .inspection import describe, plot_mask_fishers
    from .outputs import check_no_overlap, check_replaceable, is_png, staged_file

    claim = None
    if plot:  # refused before any work: never over an input, and only ever over a PNG, with --overwrite
        if Path(plot).suffix.lower() != ".png":
            raise FisherMaskError(f"--plot writes a PNG image; give a file name ending in .png, not {plot}.")
        for file in files:
            check_no_overlap(plot, {"the input": Path(file)}, option="--plot")
        claim = check_replaceable(plot, overwrite=overwrite, is_ours=is_png, what="a PNG image", folder=False,
                                  option="--plot")
    for report in describe(files, top_k).values():
        click.echo(report + "\n")
    if plot:
        masks = [f for f in files if not Path(f).is_dir()]
        if not masks:
            raise FisherMaskError("--plot draws mask-Fisher files; full-Fisher folders have no node layout to draw.")
        labels = [Path(f).stem for f in masks]
        with staged_file(plot, claim) as staging:
            width, height = plot_mask_fishers([load_mask_fisher(f) for f in masks], labels, staging,
                                              normalize=Normalize(normalize))
        click.echo(f"Wrote {plot} ({width}x{height} px)", err=True)


def run() -> None:
    """Console entry point: user errors print one clear line and exit 2, without a traceback; bugs keep theirs."""
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("mergekit_fisher_mask").setLevel(logging.INFO)
    try:
        main(standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    except FisherMaskError as error:
        click.echo(f"Error: {error}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    run()

"""The ``mergekit-fisher`` command: ``calibrate`` measures mask Fisher, ``merge`` runs a recipe with the plugin loaded,
``inspect`` summarizes and plots statistic files.

Every path the user gives is resolved once here (:func:`mergekit_fisher_mask.paths.user_path`, which expands
``~``), and that one ``Path`` is what every check and every write use.
"""

from __future__ import annotations

from ._startup import quiet_interrupts

with quiet_interrupts():
    import logging
    import sys
    from pathlib import Path

    import click
    from mergekit.options import MergeOptions, PrettyPrintHelp, add_merge_options

    from .errors import FisherMaskError, command_line
    from .merge import Normalize  # importing the package registered the plugin's methods with mergekit
    from .merge.task_heads import TASK_HEAD_POLICIES
    from .paths import user_path
    from .pipeline import run_fisher_merge
    from .settings import CalibrationSettings, calibration_options


class UserPath(click.Path):
    """A click path that arrives as one resolved ``Path`` (``~`` expanded, absolute) before click checks it."""

    def convert(self, value, param, ctx):
        if isinstance(value, Path):
            return value
        return Path(super().convert(str(user_path(value)), param, ctx))


@click.group()
@click.version_option(package_name="mergekit-fisher-mask")
@click.pass_context
def main(ctx: click.Context) -> None:
    """Data-aware merging with Fisher Mask Nodes (arXiv 2403.09891) for mergekit."""
    ctx.with_resource(command_line())  # messages spell options as on the command line (--overwrite, not overwrite=True)


@main.command()
@click.argument("model")
@click.option("--data", required=True, help="Local .jsonl/.json/.csv/.parquet/.txt file, or a datasets name[:config][@split].")
@click.option("--out", required=True, type=UserPath(), help="Output .safetensors file (a folder with --full).")
@click.option("--full", is_flag=True, help="Full diagonal Fisher of every parameter (for merge method `fisher`).")
@click.option("--gram", is_flag=True, help="RegMean's Gram matrices of every linear layer input (for merge method "
              "`regmean`); --out is a folder.")
@click.option("--gram-out", type=UserPath(), default=None,
              help="Also measure RegMean's Gram matrices in the same pass as the mask Fisher (saving the Gram pass's "
              "forwards) and write them to this folder.")
@click.option("--overwrite", is_flag=True, help="Replace --out (and --gram-out) if it already holds a file of this "
              "tool.")
@calibration_options
@click.option("--quiet", is_flag=True, help="No progress bar.")
def calibrate(model, data, out, full, gram, gram_out, overwrite, settings: CalibrationSettings, quiet) -> None:
    """Measure the Fisher information of MODEL's mask nodes (a local folder or a Hub id) on DATA; with --full, of
    every parameter; with --gram, RegMean's Gram matrices; with --gram-out, the mask Fisher and the Grams in one
    pass."""
    from accelerate import PartialState

    from .calibration.api import measure_statistics
    from .files import FullFisher, GramStats, MaskFisher

    if full and gram:
        raise FisherMaskError("--full and --gram measure different statistics; give one of them (a run each).")
    if gram_out is not None and (full or gram):
        given = "--full" if full else "--gram"
        raise FisherMaskError(f"--gram-out adds the Gram matrices to a mask-Fisher run; with {given} it does not "
                              "apply. Drop --gram-out, or measure the mask Fisher.")
    record = FullFisher if full else GramStats if gram else MaskFisher
    outputs = {record: out, **({GramStats: gram_out} if gram_out is not None else {})}
    results = measure_statistics(outputs, model, data, settings, overwrite=overwrite, progress=not quiet,
                                 out_names={GramStats: "gram_out"} if gram_out is not None else None)
    if PartialState().is_main_process:
        for kind, result in results.items():
            if kind is GramStats:
                how = f"{len(result.inputs)} Gram matrices stored in {result.gram_dtype}"
            else:
                contents = (f"{len(result.tensors)} tensors" if full else
                            ", ".join(f"{key} {tuple(value.shape)}" for key, value in result.groups.items()))
                how = f"estimator {result.estimator}, loss {result.loss}, {contents}"
            click.echo(f"Wrote {outputs[kind]}: {kind.DESCRIPTION.removeprefix('a ')} of {result.samples} samples, "
                       f"weights in {result.dtype}, {how}", err=True)


@main.command(cls=PrettyPrintHelp)
@click.argument("config_file", type=UserPath(exists=True, dir_okay=False))
@click.argument("out_path", type=UserPath(file_okay=False))
@click.option("--overwrite", is_flag=True, help="Replace OUT_PATH if it already holds a merge.")
@click.option("--task-heads", "--heads", "task_heads", type=click.Choice(TASK_HEAD_POLICIES), default="auto",
              show_default=True,
              help="Task heads (classifier layers): take from base_model (base), merge them (merge), or base only "
              "when their shapes differ (auto).")
@click.option("--verify-fingerprint/--no-verify-fingerprint", default=True, show_default=True,
              help="Refuse a Fisher file measured on different weights than the model it is used with.")
@click.option("--fisher-cache", type=UserPath(file_okay=False), default=None,
              help="Where Fisher files calibrated from `calibration_data` are cached [default: ~/.cache/mergekit-fisher-mask].")
@click.option("--push-to-hub", "push_to_hub", metavar="ORG/NAME", default=None,
              help="Upload the finished merge to this Hub repo (only after the merge fully succeeded).")
@click.option("--private", is_flag=True, help="With --push-to-hub: create the repo as private.")
@add_merge_options
def merge(merge_options: MergeOptions, config_file, out_path, overwrite, task_heads, verify_fingerprint, fisher_cache,
          push_to_hub, private) -> None:
    """Run the mergekit YAML recipe CONFIG_FILE (any merge method, including fisher_mask, fisher and regmean) and
    write the merged model to the folder OUT_PATH.

    Model paths in the recipe are relative to the current folder (as for mergekit-yaml); `fisher`, `gram` and
    `calibration_data` paths are relative to the recipe's folder, or else to the current folder. OUT_PATH may not
    be the current folder (or a folder above it)."""
    from .hub import push_folder, require_token

    if private and not push_to_hub:
        raise FisherMaskError("--private applies to --push-to-hub ORG/NAME; give both, or neither.")
    token = require_token() if push_to_hub else None  # before any work: a missing token must not waste a merge
    merge_options.apply_global_options()
    verbosity = merge_options.verbosity
    logging.getLogger().setLevel(logging.DEBUG if verbosity > 1 else logging.INFO if verbosity else logging.WARNING)
    logging.getLogger("mergekit_fisher_mask").setLevel(logging.INFO)
    out = run_fisher_merge(config_file, out_path, merge_options, overwrite=overwrite,
                           verify_fingerprint=verify_fingerprint, heads=task_heads, cache_dir=fisher_cache)
    click.echo(f"Merged model written to {out}", err=True)
    if push_to_hub:
        url = push_folder(out, push_to_hub, private=private, token=token)
        click.echo(f"Uploaded to {url}", err=True)


@main.command()
@click.argument("files", nargs=-1, required=True, type=UserPath(exists=True))
@click.option("--plot", type=UserPath(dir_okay=False), default=None, help="Write a heatmap PNG (mask-Fisher files).")
@click.option("--overwrite", is_flag=True, help="Let --plot replace an existing PNG image.")
@click.option("--top-k", type=click.IntRange(min=1), default=10, show_default=True,
              help="Heads to list, largest Fisher first.")
@click.option("--normalize", type=click.Choice([n.value for n in Normalize]), default="layer", show_default=True,
              help="Normalization used for the merge-weight panel of --plot (as in the merge).")
def inspect(files, plot, overwrite, top_k, normalize) -> None:
    """Summarize statistic FILES (mask-Fisher files, full-Fisher or Gram folders) and optionally plot mask-Fisher
    files side by side."""
    from .inspection import describe, plot_to_file

    if plot is not None and plot.suffix.lower() != ".png":
        raise FisherMaskError(f"--plot writes a PNG image; give a file name ending in .png, not {plot}.")
    plotted = plot_to_file(files, plot, overwrite=overwrite, normalize=Normalize(normalize)) if plot else None
    for report in describe(files, top_k).values():
        click.echo(report + "\n")
    if plotted:
        width, height = plotted()
        click.echo(f"Wrote {plot} ({width}x{height} px)", err=True)


def run() -> None:
    """Console entry point: user errors print one clear line and exit 2, without a traceback; bugs keep theirs;
    Ctrl-C at any time ends with exit status 130."""
    with quiet_interrupts():
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger("mergekit_fisher_mask").setLevel(logging.INFO)
        try:
            main(standalone_mode=False)
        except click.exceptions.Abort:
            click.echo("Interrupted.", err=True)
            sys.exit(130)
        except click.ClickException as error:
            error.show()
            sys.exit(error.exit_code)
        except FisherMaskError as error:
            click.echo(f"Error: {error}", err=True)
            sys.exit(2)


if __name__ == "__main__":
    run()

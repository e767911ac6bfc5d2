"""`cmc train`: semi-supervised CMC training from a datalist into a run folder.

Runs as one process, or data-parallel under `torchrun --nproc_per_node N -m cmc_cli.main train
...` (gloo on CPU, NCCL on GPU; only rank 0 writes). Heavy imports live inside `command`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from cmc_common.contract import ROLES

if TYPE_CHECKING:
    from cmc_train.config import RunConfig

# Spelled out, not imported from cmc_train.config: `cmc_cli.main` registers every command, and on
# a serving host (no cmc_train) `cmc segment` must still start. A test keeps them in step.
PRESETS = ("tiny", "small", "sam-med3d")
SCHEDULES = ("authors", "sigmoid")
SETTING_KEYS = (
    "steps", "batch_labelled", "batch_unlabelled", "lr", "weight_decay", "warmup_steps",
    "schedule", "rampup_fraction", "w_csc", "w_cac", "csc_temperature", "pair_unlabelled",
    "use_csc", "use_cac", "val_every", "seed", "fg_ratio", "intensity_jitter", "dice",
    "spacing", "normalisation.MODALITY", "img_size", "vit_patch", "embed_dim", "depth",
    "num_heads", "mlp_ratio", "window_size", "global_attn_indexes", "neck_channels",
    "adapter_dim", "adapter_scale", "decoder_channels")
NORMALISATIONS = ("ct-abdomen (window -175..250 HU), ct-brain (0..80 HU), zscore (non-zero "
                  "voxels), percentile (0.5-99.5 clip, then z-score), window:LOW:HIGH, "
                  "percentile:LOWER:UPPER")

HELP_CONFIG = ("Model preset (tiny | small | sam-med3d; classes and modalities come from the "
               "datalist, training settings from the defaults) or a run config YAML (e.g. "
               "an earlier RUN_DIR/config.yaml). With --resume the run's own config.yaml is used.")
HELP_SET = ("Change one setting of the run config, KEY=VALUE (repeatable; `train.`, "
            "`preprocess.`, `model.` prefixes optional; lists comma-separated). Keys: "
            + ", ".join(SETTING_KEYS) + ". Normalisation per modality name (printed at the "
            "start; default: ct-abdomen for a modality named ct, zscore for any other): "
            + NORMALISATIONS + ". E.g. --set spacing=1.5,1.5,3 --set normalisation.t1=percentile"
            " --set lr=1e-3.")
HELP_THREADS = ("CPU threads for PyTorch (default: all usable cores but one, shared by the "
                "processes of a torchrun run: PyTorch's own default, one per core, lets other "
                "work on the machine slow each step several times over).")


def command(
    data: Annotated[Path, typer.Option("--data", help="Datalist JSON (cmc synth / cmc import).")],
    out: Annotated[Path, typer.Option("--out", help="Run folder: checkpoint_last.pt, "
                                      "checkpoint_best.pt, metrics.jsonl, config.yaml.")],
    config: Annotated[str, typer.Option("--config", help=HELP_CONFIG)] = "tiny",
    steps: Annotated[int | None, typer.Option(min=1, help="Optimiser steps (with --resume: "
                                              "the new total).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of initialisation and sampling.")] = None,
    init_sam_med3d: Annotated[Path | None, typer.Option(
        "--init-sam-med3d", help="SAM-Med3D checkpoint (vit_b_ori) for both encoders; needs "
                                 "--config sam-med3d.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from "
                                         "checkpoint_last.pt (identical to an uninterrupted "
                                         "run).")] = False,
    schedule: Annotated[str | None, typer.Option(
        help="Consistency-weight schedule: authors (off until 0.7 T) | sigmoid ramp-up.")] = None,
    no_csc: Annotated[bool, typer.Option("--no-csc", help="Ablation: no CSC loss.")] = False,
    no_cac: Annotated[bool, typer.Option("--no-cac", help="Ablation: no CAC loss.")] = False,
    single_modality: Annotated[str | None, typer.Option(
        "--single-modality", help="Ablation: a | b, supervised training of that modality "
                                  "alone (its image feeds both branches; no unlabelled data, "
                                  "no CSC/CAC).")] = None,
    settings: Annotated[list[str] | None, typer.Option(
        "--set", metavar="KEY=VALUE", help=HELP_SET)] = None,
    val_every: Annotated[int | None, typer.Option(
        "--val-every", min=1, help="Validate (and keep the best checkpoint) every N steps; "
                                   "same as --set val_every=N.")] = None,
    threads: Annotated[int | None, typer.Option(min=1, help=HELP_THREADS)] = None,
    progress: Annotated[bool, typer.Option(help="Progress bars (only on a terminal); one line "
                                           "per validation with its Dice is printed either "
                                           "way.")] = True,
) -> None:
    """Train a CMC model from a datalist; writes checkpoints and metrics."""
    import os
    from dataclasses import replace

    from rich.console import Console

    from cmc_train.config import RunConfig
    from cmc_train.run_state import CONFIG
    from cmc_train.settings import apply_settings, parse_settings
    from cmc_train.threads import set_threads
    from cmc_train.trainer import train

    console = Console(stderr=True)

    if schedule is not None and schedule not in SCHEDULES:
        raise typer.BadParameter(f"{schedule!r} is not one of {', '.join(SCHEDULES)}",
                                 param_hint="--schedule")
    if single_modality is not None and single_modality not in ROLES:
        raise typer.BadParameter(f"{single_modality!r} is not a or b",
                                 param_hint="--single-modality")
    changes = parse_settings([*(settings or ()),
                              *([f"val_every={val_every}"] if val_every else [])])
    set_threads(threads)
    run_cfg = RunConfig.load_yaml(out / CONFIG) if resume else _base_config(config, data)
    run_cfg = apply_settings(run_cfg, changes)
    overrides: dict[str, Any] = {}
    if steps is not None:
        overrides["steps"] = steps
    if seed is not None:
        overrides["seed"] = seed
    if schedule is not None:
        overrides["schedule"] = schedule
    if no_csc or single_modality:
        overrides["use_csc"] = False
    if no_cac or single_modality:
        overrides["use_cac"] = False
    run_cfg = replace(run_cfg, train=replace(run_cfg.train, **overrides))
    summary = train(data, out, run_cfg, resume=resume, init_sam_med3d=init_sam_med3d,
                    progress=progress, single_modality=single_modality)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for the run
        console.print(
            f"cmc train: {summary.steps_done}/{summary.steps_total} steps in "
            f"{summary.train_seconds:.0f} s ({summary.steps_per_second:.2f} steps/s); best "
            f"validation mean foreground Dice {summary.best_metric:.4f} at step "
            f"{summary.best_step}; outputs in {out}", highlight=False, soft_wrap=True)


def _base_config(config: str, data: Path) -> RunConfig:
    """A preset sized to the datalist's classes and modalities, or a run config YAML."""
    from cmc_train.config import named_or_yaml_run_config
    from cmc_train.data.datalist import Datalist

    datalist = Datalist.load(data)
    return named_or_yaml_run_config(config, len(datalist.classes), datalist.modalities)

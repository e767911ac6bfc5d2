"""Semi-supervised CMC training: one loop for CPU, one GPU and `torchrun` data parallelism.

Each step draws a labelled batch and an unlabelled batch per modality from the step-indexed
sampler and minimises
    L = L_sup + w_csc(t) * CSC(F^a_u, F^b_u) + w_cac(t) * CAC(softmax^a_u, softmax^b_u),
with L_sup the mean of the two modalities' CE + Dice on their own labelled batches. Labelled
and unlabelled images go through the network in one forward pass (concatenated along the
batch; the network normalises per sample, so this changes nothing but speed, and DDP sees
one forward per backward).

Exact resume: the sampler is a pure function of (seed, step, rank); the checkpoint carries
the optimiser, LR scheduler, grad scaler and RNG states, so N steps in one go and k steps
followed by `--resume` give the same losses bit for bit on CPU. What a run holds and how it
is saved, restored and laid out on disk is `run_state`; this module is the loop over it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from cmc_train.config import RunConfig
from cmc_train.data.loaders import SemiSupervisedSampler
from cmc_train.distributed import (
    DistContext,
    barrier,
    mean_over_ranks,
    setup_distributed,
    teardown_distributed,
)
from cmc_train.evaluate import ValidationSet, validate
from cmc_train.losses import cac_loss, consistency_weights, csc_loss, supervised_loss
from cmc_train.network import load_sam_med3d_encoder
from cmc_train.progress import Reporter
from cmc_train.run_state import (
    BEST,
    CONFIG,
    LAST,
    METRICS,
    Ablation,
    MetricsLog,
    RunState,
    TrainError,
    prepare_run_dir,
    validation_modes,
)


@dataclass(frozen=True)
class TrainSummary:
    """What a finished (or interrupted) run reports."""

    run_dir: Path
    steps_done: int
    steps_total: int
    best_metric: float
    best_step: int
    last_validation: dict[str, Any] | None
    train_seconds: float
    steps_per_second: float


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch; on CPU also ask for deterministic kernels (bit-exact reruns and resume;
    on GPU the fast kernels stay). The process-wide setting is restored afterwards."""
    torch.manual_seed(seed)
    previous = (torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled())
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


@dataclass(frozen=True)
class _Losses:
    """Loss terms of one step (`total` carries the gradient, the others are detached)."""

    total: torch.Tensor
    sup: torch.Tensor
    csc: torch.Tensor
    cac: torch.Tensor
    w_csc: float
    w_cac: float


def _step_losses(model: nn.Module, batch: dict[str, Any], run_cfg: RunConfig, step: int,
                 ablation: Ablation, device: torch.device) -> _Losses:
    """Forward one sampled batch and combine the loss terms."""
    cfg = run_cfg.train
    zero = torch.zeros((), device=device)
    la_img, la_lbl = batch["labelled_a"]["image"].to(device), batch["labelled_a"]["label"].to(device)
    lb_img, lb_lbl = batch["labelled_b"]["image"].to(device), batch["labelled_b"]["label"].to(device)
    if ablation.single_modality is not None:
        # One modality alone: its image feeds both branches (the single-modality inference
        # protocol) and only its own branch is supervised; no unlabelled data, no CSC / CAC.
        image, label = (la_img, la_lbl) if ablation.single_modality == "a" else (lb_img, lb_lbl)
        out = model(image, image)
        logits = out.logits_a if ablation.single_modality == "a" else out.logits_b
        sup = supervised_loss(logits, label, cfg.dice)
        return _Losses(sup, sup.detach(), zero, zero, 0.0, 0.0)

    f_csc, f_cac = consistency_weights(step, cfg.steps, cfg.schedule, cfg.rampup_fraction)
    w_csc = cfg.w_csc * f_csc if cfg.use_csc else 0.0
    w_cac = cfg.w_cac * f_cac if cfg.use_cac else 0.0
    n_lab = la_img.shape[0]
    if w_csc > 0 or w_cac > 0:
        image_a = torch.cat([la_img, batch["unlabelled_a"]["image"].to(device)])
        image_b = torch.cat([lb_img, batch["unlabelled_b"]["image"].to(device)])
    else:  # both consistency terms are off at this step: skip the unlabelled forward
        image_a, image_b = la_img, lb_img
    out = model(image_a, image_b)
    sup = 0.5 * (supervised_loss(out.logits_a[:n_lab], la_lbl, cfg.dice)
                 + supervised_loss(out.logits_b[:n_lab], lb_lbl, cfg.dice))
    csc = csc_loss(out.features_a[n_lab:], out.features_b[n_lab:], cfg.csc_temperature) \
        if w_csc > 0 else zero
    cac = cac_loss(out.logits_a[n_lab:], out.logits_b[n_lab:]) if w_cac > 0 else zero
    total = sup + w_csc * csc + w_cac * cac
    return _Losses(total, sup.detach(), csc.detach(), cac.detach(), w_csc, w_cac)


def _loss_text(record: dict[str, Any]) -> str:
    return (f"loss {record['loss']:.3f} sup {record['sup']:.3f} csc {record['csc']:.3f} "
            f"cac {record['cac']:.3f}")


def train(
    datalist_path: Path,
    run_dir: Path,
    run_cfg: RunConfig,
    resume: bool = False,
    init_sam_med3d: Path | None = None,
    progress: bool = True,
    single_modality: str | None = None,
    stop_after: int | None = None,
) -> TrainSummary:
    """Train (or resume) a CMC model; writes checkpoint_last.pt, checkpoint_best.pt,
    metrics.jsonl and config.yaml into `run_dir` (rank 0 only).

    `single_modality` ("a" | "b") is the one-branch supervised ablation. `stop_after` ends the
    run after that many completed steps with a resumable checkpoint, as a pre-emption would
    (the LR and consistency schedules still follow `run_cfg.train.steps`).
    """
    ablation = Ablation(single_modality)
    if run_cfg.train.steps < 1 or run_cfg.train.val_every < 1:
        raise TrainError("train.steps and train.val_every must be >= 1")
    if init_sam_med3d is not None and resume:
        raise TrainError(f"{init_sam_med3d}: --init-sam-med3d starts a run; a resumed run "
                         "already carries its weights")
    ctx = setup_distributed()
    try:
        with _seeded(run_cfg.train.seed, ctx.device):
            return _run(datalist_path, run_dir, run_cfg, ctx, ablation, resume, init_sam_med3d,
                        progress, stop_after)
    finally:
        teardown_distributed(ctx)


def _run(datalist_path: Path, run_dir: Path, run_cfg: RunConfig, ctx: DistContext,
         ablation: Ablation, resume: bool, init_sam_med3d: Path | None, progress: bool,
         stop_after: int | None) -> TrainSummary:
    """Set up the run (fresh or resumed) on this rank and train."""
    run = RunState(datalist_path, run_dir, run_cfg, ctx, ablation)
    ckpt = prepare_run_dir(run, resume)
    barrier(ctx)
    if ckpt is not None:
        run.restore(ckpt, run.run_dir / LAST)
    else:
        if init_sam_med3d is not None:
            load_sam_med3d_encoder(run.net, init_sam_med3d)
            run.init_sam_med3d = str(init_sam_med3d)
        run.build_optimiser()
    if ctx.is_main:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        run_cfg.save_yaml(run.run_dir / CONFIG)
    return _loop(run, resume, progress, stop_after)


def _loop(run: RunState, resumed: bool, progress: bool, stop_after: int | None) -> TrainSummary:
    ctx, tc = run.ctx, run.cfg.train
    model: nn.Module = run.net
    if ctx.distributed:
        model = DistributedDataParallel(
            run.net, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
            find_unused_parameters=run.ablation.single_modality is not None)
    sampler = SemiSupervisedSampler(run.datalist, run.cfg, ctx.rank, ctx.world_size)
    log = MetricsLog(run.run_dir / METRICS, run.step if resumed else None) if ctx.is_main else None
    val_set = ValidationSet.from_datalist(run.datalist, run.cfg.preprocess) if ctx.is_main else None
    end = tc.steps if stop_after is None else min(tc.steps, stop_after)
    assert run.optimizer is not None
    model.train()
    with Reporter(progress, enabled=ctx.is_main) as reporter:
        for line in run.describe():
            reporter.say(line)
        task = reporter.stage("train", total=tc.steps, completed=run.step)
        for step in range(run.step, end):
            started = time.perf_counter()
            batch = sampler.batch(step)
            with run.autocast:
                losses = _step_losses(model, batch, run.cfg, step, run.ablation, ctx.device)
            run.optimizer.zero_grad(set_to_none=True)
            run.scaler.scale(losses.total).backward()
            run.scaler.step(run.optimizer)
            run.scaler.update()
            lr = run.scheduler.get_last_lr()[0]
            run.scheduler.step()
            run.step = step + 1
            terms = mean_over_ranks(ctx, torch.stack(
                [losses.total.detach(), losses.sup, losses.csc, losses.cac]).float())
            run.elapsed += time.perf_counter() - started
            record = {"kind": "train", "step": run.step, "loss": terms[0].item(),
                      "sup": terms[1].item(), "csc": terms[2].item(), "cac": terms[3].item(),
                      "w_csc": losses.w_csc, "w_cac": losses.w_cac, "lr": lr,
                      "seconds": round(run.elapsed, 3)}
            if log is not None:
                log.write(record)
            reporter.update(task, completed=run.step, info=_loss_text(record))
            if run.step % tc.val_every == 0 or run.step == tc.steps:
                _validate_and_save(run, val_set, log, reporter)
            elif run.step == end:  # stopped early: keep a resumable checkpoint
                if ctx.is_main:
                    run.save(LAST, with_trainer_state=True)
                barrier(ctx)
        if run.step == tc.steps and ctx.is_main:
            _record_qc_reference(run, val_set, reporter)
        barrier(ctx)
    return TrainSummary(run.run_dir, run.step, tc.steps, run.best_metric, run.best_step,
                        run.last_validation, run.elapsed,
                        run.step / run.elapsed if run.elapsed else 0.0)


def _validate_and_save(run: RunState, val_set: ValidationSet | None, log: MetricsLog | None,
                       reporter: Reporter) -> None:
    """Rank 0 validates and writes checkpoints; the other ranks wait."""
    if run.ctx.is_main:
        assert val_set is not None and log is not None
        modes = validation_modes(run.ablation)
        started = time.perf_counter()
        task = reporter.stage("validate", total=val_set.count(modes))
        result = validate(run.net, val_set, modes, run.cfg.model.img_size, run.ctx.device,
                          on_volume=lambda: reporter.update(task, advance=1))
        reporter.finish(task)
        run.last_validation = {"step": run.step, **result}
        log.write({"kind": "val", **run.last_validation})
        improved = result["mean_fg_dice"] > run.best_metric
        if improved:
            run.best_metric, run.best_step = result["mean_fg_dice"], run.step
        run.save(LAST, with_trainer_state=True)
        if improved:
            run.save(BEST, with_trainer_state=False)
        per_modality = ", ".join(f"{m} {sum(d) / len(d):.4f}" for m, d in result["dice"].items())
        dead = (f"; never found (Dice 0): {', '.join(result['dead_classes'])}"
                if result["dead_classes"] else "")
        reporter.say(f"step {run.step}/{run.cfg.train.steps}: validation mean foreground Dice "
                     f"{result['mean_fg_dice']:.4f} ({per_modality}; best "
                     f"{run.best_metric:.4f} at step {run.best_step}; "
                     f"{time.perf_counter() - started:.0f} s){dead}")
    barrier(run.ctx)


def _record_qc_reference(run: RunState, val_set: ValidationSet | None, reporter: Reporter) -> None:
    """The finished run's checkpoints get what quality control judges cases by: the
    training data's fingerprint and anatomy, and each checkpoint's branch agreement on the
    validation cases (`cmc_train.qc_reference`)."""
    from cmc_train.qc_reference import record_reference

    paths = [run.run_dir / name for name in (BEST, LAST) if (run.run_dir / name).is_file()]
    record_reference(paths, run.datalist, val_set, run.ctx.device, say=reporter.say)

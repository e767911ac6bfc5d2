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
followed by `--resume` give the same losses bit for bit on CPU.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from cmc_common.contract import ROLES
from cmc_common.errors import CmcError
from cmc_train.checkpoint import (
    CheckpointError,
    LoadedCheckpoint,
    build_metadata,
    load_checkpoint,
    save_checkpoint,
)
from cmc_train.config import RunConfig
from cmc_train.data.checks import check_data
from cmc_train.data.datalist import Datalist
from cmc_train.data.loaders import SemiSupervisedSampler
from cmc_train.distributed import (
    DistContext,
    barrier,
    mean_over_ranks,
    setup_distributed,
    teardown_distributed,
)
from cmc_train.errors import ConfigError
from cmc_train.evaluate import ValidationSet, validate
from cmc_train.losses import cac_loss, consistency_weights, csc_loss, supervised_loss
from cmc_train.network import build_cmc, load_sam_med3d_encoder
from cmc_train.normalisation import default_normalisation, describe
from cmc_train.progress import Reporter

LAST = "checkpoint_last.pt"
BEST = "checkpoint_best.pt"
METRICS = "metrics.jsonl"
CONFIG = "config.yaml"


class TrainError(CmcError):
    """A training run cannot start or resume (message names the file and the problem)."""


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


@dataclass(frozen=True)
class Ablation:
    """Ablation switches: `single_modality` trains one branch on its labelled data alone."""

    single_modality: str | None = None

    def __post_init__(self) -> None:
        if self.single_modality not in (None, *ROLES):
            raise ConfigError(f"single_modality must be 'a' or 'b', got {self.single_modality!r}")


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up to the base LR over `warmup_steps`, then cosine decay to 0 at the end."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup_steps) / span)))


def file_sha256(path: Path) -> str:
    """Content hash of the datalist, recorded so a resume on changed data is refused."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


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


def _autocast(device: torch.device) -> tuple[AbstractContextManager[Any], torch.amp.GradScaler]:
    """bf16 autocast where the GPU supports it, else fp16 with loss scaling; none on CPU."""
    if device.type != "cuda":
        return nullcontext(), torch.amp.GradScaler("cpu", enabled=False)
    if torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16), torch.amp.GradScaler("cuda", enabled=False)
    return torch.autocast("cuda", dtype=torch.float16), torch.amp.GradScaler("cuda")


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


class _MetricsLog:
    """RUN_DIR/metrics.jsonl, one JSON object per line; rank 0 only."""

    def __init__(self, path: Path, keep_until_step: int | None) -> None:
        self.path = path
        if keep_until_step is None:
            path.write_text("")
        else:  # resume: drop what was logged after the checkpoint we restart from
            kept = [line for line in self._read(path) if line["step"] <= keep_until_step]
            path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    @staticmethod
    def _read(path: Path) -> list[dict[str, Any]]:
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")


class _Run:
    """State of one training process (one rank)."""

    def __init__(self, datalist_path: Path, run_dir: Path, run_cfg: RunConfig,
                 ctx: DistContext, ablation: Ablation) -> None:
        self.datalist_path = Path(datalist_path)
        self.run_dir = Path(run_dir)
        self.cfg = run_cfg
        self.ctx = ctx
        self.ablation = ablation
        self.datalist = Datalist.load(self.datalist_path)
        self.datalist_sha256 = file_sha256(self.datalist_path)
        self._check_data()
        self.classes = list(self.datalist.classes)
        self.net = build_cmc(run_cfg.model).to(ctx.device)
        self.init_sam_med3d: str | None = None
        self.step = 0
        self.best_metric = -1.0
        self.best_step = 0
        self.last_validation: dict[str, Any] | None = None
        self.elapsed = 0.0
        self.optimizer: torch.optim.Optimizer | None = None

    def _check_data(self) -> None:
        """The datalist fits the config, and its files pass `check_data`, before any step."""
        modalities = tuple(self.datalist.modalities)
        if modalities != tuple(self.cfg.preprocess.modalities):
            raise TrainError(f"{self.datalist_path}: modalities {list(modalities)} differ from "
                             f"the run config's {list(self.cfg.preprocess.modalities)}")
        if len(self.datalist.classes) != self.cfg.model.num_classes:
            raise TrainError(f"{self.datalist_path}: {len(self.datalist.classes)} classes, but "
                             f"the model config has num_classes={self.cfg.model.num_classes}")
        trained = [modalities[0 if mode == "a" else 1] for mode in _validation_modes(self.ablation)]
        check_data(self.datalist, self.datalist_path, ("labelled", "unlabelled", "validation"),
                   need_labelled=trained, need_validation=trained).raise_first()

    def describe(self) -> list[str]:
        """What this run is about to do, printed before the first step."""
        tc, prep = self.cfg.train, self.cfg.preprocess
        lines = [f"cmc train: {len(self.datalist.labelled)} labelled, "
                 f"{len(self.datalist.unlabelled)} unlabelled, "
                 f"{len(self.datalist.validation)} validation cases; preset {self.cfg.preset}, "
                 f"{tc.steps} steps, validation every {tc.val_every} steps, spacing "
                 f"{'x'.join(f'{s:g}' for s in prep.spacing)} mm, device {self.ctx.device}"]
        for modality in prep.modalities:
            norm = prep.normalisation[modality]
            default = (f" [default for {modality!r}; --set normalisation.{modality}=PRESET "
                       "chooses another]" if norm == default_normalisation(modality) else "")
            lines.append(f"cmc train: normalisation of {modality}: {describe(norm)}{default}")
        return lines

    def build_optimiser(self) -> None:
        params = [p for p in self.net.parameters() if p.requires_grad]
        tc = self.cfg.train
        self.optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, tc.warmup_steps, tc.steps))
        self.autocast, self.scaler = _autocast(self.ctx.device)

    def training_summary(self) -> dict[str, Any]:
        tc = self.cfg.train
        return {
            "steps": self.step, "steps_total": tc.steps, "seed": tc.seed,
            "best_metric": self.best_metric, "best_step": self.best_step,
            "best_metric_name": "mean foreground Dice (validation, single-modality modes)",
            "last_validation": self.last_validation,
            "datalist": str(self.datalist_path), "datalist_sha256": self.datalist_sha256,
            "schedule": tc.schedule, "use_csc": tc.use_csc, "use_cac": tc.use_cac,
            "single_modality": self.ablation.single_modality,
            "init_sam_med3d": self.init_sam_med3d, "world_size": self.ctx.world_size,
            "device": str(self.ctx.device), "train_seconds": round(self.elapsed, 3),
            "steps_per_second": round(self.step / self.elapsed, 4) if self.elapsed else None,
        }

    def trainer_state(self) -> dict[str, Any]:
        assert self.optimizer is not None
        state: dict[str, Any] = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step, "best_metric": self.best_metric, "best_step": self.best_step,
            "elapsed": self.elapsed, "torch_rng": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        return state

    def restore(self, ckpt: LoadedCheckpoint, path: Path) -> None:
        if ckpt.trainer_state is None:
            raise TrainError(f"{path}: checkpoint has no trainer state to resume from")
        training = ckpt.metadata["training"]
        if training.get("datalist_sha256") != self.datalist_sha256:
            raise TrainError(f"{self.datalist_path}: datalist changed since {path} was written; "
                             "resume needs the same data")
        if training.get("single_modality") != self.ablation.single_modality:
            raise TrainError(f"{path}: was trained with single_modality="
                             f"{training.get('single_modality')!r}; resume with the same setting")
        self.init_sam_med3d = training.get("init_sam_med3d")
        if self.init_sam_med3d:  # re-apply the freezing that loading SAM-Med3D weights implies
            for encoder in (self.net.encoder_a, self.net.encoder_b):
                for _, param in encoder.pretrained_frozen_parameters():
                    param.requires_grad_(False)
        self.net.load_state_dict(ckpt.state_dict)
        self.build_optimiser()
        assert self.optimizer is not None
        ts = ckpt.trainer_state
        self.optimizer.load_state_dict(ts["optimizer"])
        self.scheduler.load_state_dict(ts["scheduler"])
        self.scaler.load_state_dict(ts["scaler"])
        self.step, self.elapsed = int(ts["step"]), float(ts["elapsed"])
        self.best_metric, self.best_step = float(ts["best_metric"]), int(ts["best_step"])
        self.last_validation = training.get("last_validation")
        torch.set_rng_state(ts["torch_rng"])
        if "cuda_rng" in ts and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ts["cuda_rng"])

    def save(self, name: str, with_trainer_state: bool) -> None:
        metadata = build_metadata(self.cfg.model, self.cfg.preprocess, self.classes,
                                  self.training_summary())
        save_checkpoint(self.run_dir / name, self.net.state_dict(), metadata,
                        self.trainer_state() if with_trainer_state else None)


def _validation_modes(ablation: Ablation) -> Sequence[str]:
    return ROLES if ablation.single_modality is None else (ablation.single_modality,)


def _loss_text(record: dict[str, Any]) -> str:
    return (f"loss {record['loss']:.3f} sup {record['sup']:.3f} csc {record['csc']:.3f} "
            f"cac {record['cac']:.3f}")


def _prepare_run_dir(run: _Run, resume: bool) -> LoadedCheckpoint | None:
    """Check the run folder; on resume return the checkpoint to restart from."""
    last = run.run_dir / LAST
    if not resume:
        if last.exists():
            raise TrainError(f"{last}: a run already exists in {run.run_dir}; pass --resume to "
                             "continue it or choose another --out folder")
        return None
    if not last.exists():
        raise TrainError(f"{last}: nothing to resume (no checkpoint_last.pt in {run.run_dir})")
    saved_cfg_path = run.run_dir / CONFIG
    if saved_cfg_path.exists():
        saved = RunConfig.load_yaml(saved_cfg_path).to_dict()
        current = run.cfg.to_dict()
        saved["train"].pop("steps"), current["train"].pop("steps")
        if saved != current:
            raise TrainError(f"{saved_cfg_path}: the run configuration differs from the one "
                             "being resumed (only the number of steps may change)")
    try:
        return load_checkpoint(last)
    except CheckpointError as exc:
        raise TrainError(str(exc)) from exc


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
    run = _Run(datalist_path, run_dir, run_cfg, ctx, ablation)
    ckpt = _prepare_run_dir(run, resume)
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


def _loop(run: _Run, resumed: bool, progress: bool, stop_after: int | None) -> TrainSummary:
    ctx, tc = run.ctx, run.cfg.train
    model: nn.Module = run.net
    if ctx.distributed:
        model = DistributedDataParallel(
            run.net, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
            find_unused_parameters=run.ablation.single_modality is not None)
    sampler = SemiSupervisedSampler(run.datalist, run.cfg, ctx.rank, ctx.world_size)
    log = _MetricsLog(run.run_dir / METRICS, run.step if resumed else None) if ctx.is_main else None
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


def _validate_and_save(run: _Run, val_set: ValidationSet | None, log: _MetricsLog | None,
                       reporter: Reporter) -> None:
    """Rank 0 validates and writes checkpoints; the other ranks wait."""
    if run.ctx.is_main:
        assert val_set is not None and log is not None
        modes = _validation_modes(run.ablation)
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


def _record_qc_reference(run: _Run, val_set: ValidationSet | None, reporter: Reporter) -> None:
    """The finished run's checkpoints get what quality control judges cases by: the
    training data's fingerprint and anatomy, and each checkpoint's branch agreement on the
    validation cases (`cmc_train.qc_reference`)."""
    from cmc_train.qc_reference import record_reference

    paths = [run.run_dir / name for name in (BEST, LAST) if (run.run_dir / name).is_file()]
    record_reference(paths, run.datalist, val_set, run.ctx.device, say=reporter.say)


def iter_metrics(run_dir: Path) -> Iterator[dict[str, Any]]:
    """The records of RUN_DIR/metrics.jsonl, in order."""
    for line in (Path(run_dir) / METRICS).read_text().splitlines():
        if line.strip():
            yield json.loads(line)

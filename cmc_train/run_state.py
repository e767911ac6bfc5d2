"""One training run's state on one rank, and its folder: what a step reads and a resume restores.

`RunState` holds the network, the optimiser, LR scheduler and grad scaler, the step and the
best validation so far; `trainer_state()` is what a checkpoint carries for an exact resume
(those states plus the RNG states, `elapsed` and the best metric) and `restore` puts it
back after checking the datalist and the ablation are those of the run being resumed.
`prepare_run_dir` refuses to overwrite a run or to resume one whose config changed (only the
number of steps may). The run folder holds checkpoint_last.pt, checkpoint_best.pt,
metrics.jsonl (`MetricsLog`, read back by `iter_metrics`) and config.yaml.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cmc_common.contract import ROLES
from cmc_common.errors import CmcError
from cmc_train.checkpoint import (
    LoadedCheckpoint,
    build_metadata,
    load_checkpoint,
    save_checkpoint,
)
from cmc_train.config import RunConfig
from cmc_train.data.checks import check_data
from cmc_train.data.datalist import Datalist
from cmc_train.distributed import DistContext
from cmc_train.errors import ConfigError
from cmc_train.network import build_cmc
from cmc_train.normalisation import default_normalisation, describe

LAST = "checkpoint_last.pt"
BEST = "checkpoint_best.pt"
METRICS = "metrics.jsonl"
CONFIG = "config.yaml"


class TrainError(CmcError):
    """A training run cannot start or resume (message names the file and the problem)."""


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


def validation_modes(ablation: Ablation) -> Sequence[str]:
    """The modes validation scores (and whose labelled and validation data the run needs)."""
    return ROLES if ablation.single_modality is None else (ablation.single_modality,)


def _autocast(device: torch.device) -> tuple[AbstractContextManager[Any], torch.amp.GradScaler]:
    """bf16 autocast where the GPU supports it, else fp16 with loss scaling; none on CPU."""
    if device.type != "cuda":
        return nullcontext(), torch.amp.GradScaler("cpu", enabled=False)
    if torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16), torch.amp.GradScaler("cuda", enabled=False)
    return torch.autocast("cuda", dtype=torch.float16), torch.amp.GradScaler("cuda")


class MetricsLog:
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


class RunState:
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
        trained = [modalities[0 if mode == "a" else 1] for mode in validation_modes(self.ablation)]
        check_data(self.datalist, self.datalist_path,
                   ("labelled", "unlabelled", "validation", "calibration"),
                   need_labelled=trained, need_validation=trained).raise_first()

    def describe(self) -> list[str]:
        """What this run is about to do, printed before the first step."""
        tc, prep = self.cfg.train, self.cfg.preprocess
        lines = [f"cmc train: {len(self.datalist.labelled)} labelled, "
                 f"{len(self.datalist.unlabelled)} unlabelled, "
                 f"{len(self.datalist.validation)} validation, "
                 f"{len(self.datalist.calibration)} calibration cases; preset {self.cfg.preset}, "
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


def prepare_run_dir(run: RunState, resume: bool) -> LoadedCheckpoint | None:
    """Check the run folder; on resume return the checkpoint to restart from (a damaged one
    raises its CheckpointError)."""
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
    return load_checkpoint(last)


def iter_metrics(run_dir: Path) -> Iterator[dict[str, Any]]:
    """The records of RUN_DIR/metrics.jsonl, in order."""
    for line in (Path(run_dir) / METRICS).read_text().splitlines():
        if line.strip():
            yield json.loads(line)

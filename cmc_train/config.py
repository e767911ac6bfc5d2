"""Run configuration: model size, pre-processing and training schedule.

Pure Python (no torch import) so that the CLI, the exporter and tests can read a
configuration without loading PyTorch. The same dataclasses travel inside checkpoints
(as JSON) and inside `config.yaml` in a run directory.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cmc_train.errors import ConfigError
from cmc_train.normalisation import checked, default_normalisation


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the CMC network (one ViT3D encoder per modality, SAM-Med3D layout)."""

    img_size: int = 32
    vit_patch: int = 4
    embed_dim: int = 96
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    window_size: int = 0
    global_attn_indexes: tuple[int, ...] = ()
    neck_channels: int = 64
    adapter_dim: int = 16
    adapter_scale: float = 0.5
    decoder_channels: int = 16
    num_classes: int = 5

    def __post_init__(self) -> None:
        if self.img_size % self.vit_patch:
            raise ConfigError(f"img_size {self.img_size} is not a multiple of vit_patch {self.vit_patch}")
        if self.embed_dim % self.num_heads:
            raise ConfigError(f"embed_dim {self.embed_dim} is not a multiple of num_heads {self.num_heads}")
        if self.num_classes < 2:
            raise ConfigError("num_classes counts the background and must be >= 2")

    @property
    def grid_size(self) -> int:
        """Token grid edge (S / p)."""
        return self.img_size // self.vit_patch

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["global_attn_indexes"] = list(self.global_attn_indexes)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown model config keys: {sorted(unknown)}")
        d = dict(d)
        if "global_attn_indexes" in d:
            d["global_attn_indexes"] = tuple(d["global_attn_indexes"])
        return cls(**d)


MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # Trains on a 2-core CPU in minutes.
    "tiny": dict(img_size=32, vit_patch=4, embed_dim=96, depth=4, num_heads=4,
                 neck_channels=64, adapter_dim=16, decoder_channels=16),
    # A bigger CPU/GPU model with the SAM-Med3D grid pattern (global + windowed blocks).
    "small": dict(img_size=64, vit_patch=8, embed_dim=192, depth=6, num_heads=6,
                  window_size=4, global_attn_indexes=(2, 5), neck_channels=128,
                  adapter_dim=32, decoder_channels=24),
    # SAM-Med3D ViT-B (vit_b_ori): loads the public checkpoint.
    "sam-med3d": dict(img_size=128, vit_patch=16, embed_dim=768, depth=12, num_heads=12,
                      window_size=14, global_attn_indexes=(2, 5, 8, 11), neck_channels=384,
                      adapter_dim=64, decoder_channels=32),
}


# Training settings that differ from `TrainConfig`'s defaults, per preset. tiny trains from
# scratch in minutes on a CPU. On the demo study, 250 steps, validation mean foreground Dice:
# lr 1e-3 0.47, 3e-3 0.59, 5e-3 behind 3e-3 at every validation (0.27 vs 0.40 at step 100),
# so tiny uses 3e-3. Its 16 decoder channels: 8 made a step 26% cheaper but left one organ of
# a left/right pair at Dice 0 in one modality after 250 steps (0.75 with 16).
# sam-med3d fine-tunes a pretrained encoder at the authors' 1e-4.
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(lr=3e-3),
    "small": dict(lr=1e-3),
    "sam-med3d": dict(lr=1e-4),
}


def model_config(name: str, num_classes: int) -> ModelConfig:
    """A named preset with the data's number of classes (background included)."""
    if name not in MODEL_PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {sorted(MODEL_PRESETS)}")
    return ModelConfig(num_classes=num_classes, **MODEL_PRESETS[name])


def preset_run_config(name: str, num_classes: int, modalities: tuple[str, str]) -> RunConfig:
    """The run configuration of a named preset for data with `num_classes` classes
    (background included) and these two modalities: its model, the default pre-processing
    and the preset's training settings."""
    return RunConfig(model=model_config(name, num_classes),
                     preprocess=PreprocessConfig(modalities=modalities),
                     train=TrainConfig(**TRAIN_PRESETS[name]), preset=name)


def named_or_yaml_run_config(config: str, num_classes: int,
                             modalities: tuple[str, str]) -> RunConfig:
    """`config` as `cmc train --config` takes it: a preset name, sized to the data's classes
    and modalities, or the path of a run config YAML (e.g. an earlier run's config.yaml)."""
    if config in MODEL_PRESETS:
        return preset_run_config(config, num_classes, modalities)
    path = Path(config)
    if path.suffix not in (".yaml", ".yml"):
        raise ConfigError(f"--config {config!r}: use a preset ({', '.join(MODEL_PRESETS)}) or a "
                          ".yaml run config")
    return RunConfig.load_yaml(path)


@dataclass(frozen=True)
class PreprocessConfig:
    """Deterministic pre-processing; recorded in checkpoints so inference reproduces it.

    `normalisation` maps each modality to its settings (`cmc_train.normalisation`); left
    empty, every modality gets `default_normalisation` (ct-abdomen for "ct", else zscore)."""

    modalities: tuple[str, str] = ("ct", "mr")
    spacing: tuple[float, float, float] = (2.0, 2.0, 2.0)
    orientation: str = "RAS"
    normalisation: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.modalities) != 2 or self.modalities[0] == self.modalities[1]:
            raise ConfigError(f"need two distinct modality names, got {self.modalities}")
        if self.orientation != "RAS":
            raise ConfigError("only RAS orientation is supported")
        if not self.normalisation:
            object.__setattr__(self, "normalisation",
                               {m: default_normalisation(m) for m in self.modalities})
        missing = [m for m in self.modalities if m not in self.normalisation]
        if missing:
            raise ConfigError(f"no normalisation for modalities {missing}")
        valid = {}
        for m, norm in self.normalisation.items():
            try:
                valid[m] = checked(norm)
            except ValueError as exc:
                raise ConfigError(f"normalisation of modality {m}: {exc}") from None
        object.__setattr__(self, "normalisation", valid)

    def to_dict(self) -> dict[str, Any]:
        return {"modalities": list(self.modalities), "spacing": list(self.spacing),
                "orientation": self.orientation,
                "normalisation": {k: dict(v) for k, v in self.normalisation.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessConfig:
        spacing = [float(s) for s in d["spacing"]]
        modalities = list(d["modalities"])
        if len(spacing) != 3 or len(modalities) != 2:
            raise ConfigError(f"need 3 spacings and 2 modalities, got {spacing} and {modalities}")
        return cls(modalities=(modalities[0], modalities[1]),
                   spacing=(spacing[0], spacing[1], spacing[2]),
                   orientation=d.get("orientation", "RAS"),
                   normalisation={k: dict(v) for k, v in d.get("normalisation", {}).items()})


SCHEDULES = ("authors", "sigmoid")  # consistency-weight schedules (docs/METHOD.md, 'Losses')
DICE_FORMS = ("sample", "batch-foreground")  # soft Dice of the supervised loss


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and semi-supervised schedule (docs/METHOD.md, 'Training protocol')."""

    steps: int = 250
    batch_labelled: int = 2
    batch_unlabelled: int = 1
    lr: float = 1e-3
    weight_decay: float = 1e-5
    warmup_steps: int = 20
    schedule: str = "sigmoid"  # "authors" | "sigmoid"
    rampup_fraction: float = 0.4
    w_csc: float = 0.1
    # CAC compares the predictions of independently drawn unlabelled CT and MR crops (other
    # subjects, other places on unpaired data), so it can never be met; at 0.5 it was as
    # large as the supervised loss and CMC lost to supervised fusion; 0.1 did best
    # (bench/quality.py; the Dice of each weight in BENCHMARKS.md, "Why w_cac 0.1").
    w_cac: float = 0.1
    csc_temperature: float = 0.5
    # Deviation from the method (docs/METHOD.md, 'Paired unlabelled patches'): item i of the
    # unlabelled a and b batches share one augmentation draw (flips, crop corner where the
    # shapes allow, intensity jitter), so CSC and CAC compare patches that show the body the
    # same way round instead of independently flipped ones.
    pair_unlabelled: bool = False
    use_csc: bool = True
    use_cac: bool = True
    val_every: int = 50
    seed: int = 0
    num_workers: int = 0
    fg_ratio: float = 0.5
    # The +- range of the labelled and unlabelled patches' random intensity scale and shift.
    intensity_jitter: float = 0.1
    # Soft Dice of the supervised loss (cmc_train.losses.supervised_loss): one Dice per
    # foreground class over the whole batch. The per-sample Dice over all classes left the
    # demo's CT spleen at Dice 0 after 250 steps (0.74 with this; BENCHMARKS.md, "Dead classes").
    dice: str = "batch-foreground"

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule {self.schedule!r} (authors | sigmoid)")
        if self.dice not in DICE_FORMS:
            raise ConfigError(f"unknown dice {self.dice!r} ({' | '.join(DICE_FORMS)})")
        if not 0.0 <= self.intensity_jitter < 1.0:
            raise ConfigError(f"intensity_jitter must lie in [0, 1), got {self.intensity_jitter}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown train config keys: {sorted(unknown)}")
        # cmc writes every field, so a config without `dice` is one written before it existed,
        # which trained with the per-sample Dice: a resumed run or a reused config.yaml keeps
        # the loss it started with.
        return cls(**{"dice": "sample", **d})


@dataclass(frozen=True)
class RunConfig:
    """Everything `cmc train` needs besides the datalist; saved as RUN_DIR/config.yaml."""

    model: ModelConfig
    preprocess: PreprocessConfig
    train: TrainConfig
    preset: str = "custom"

    def to_dict(self) -> dict[str, Any]:
        return {"preset": self.preset, "model": self.model.to_dict(),
                "preprocess": self.preprocess.to_dict(), "train": self.train.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        return cls(model=ModelConfig.from_dict(d["model"]),
                   preprocess=PreprocessConfig.from_dict(d["preprocess"]),
                   train=TrainConfig.from_dict(d.get("train", {})),
                   preset=d.get("preset", "custom"))

    def save_yaml(self, path: Path) -> None:
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load_yaml(cls, path: Path) -> RunConfig:
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: cannot read config ({exc})") from exc
        if not isinstance(data, dict) or "model" not in data or "preprocess" not in data:
            raise ConfigError(f"{path}: not a cmc run config (needs 'model' and 'preprocess')")
        return cls.from_dict(data)

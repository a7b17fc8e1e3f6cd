"""The one typed schema of a training run. Its defaults are the integrated DINO + slot-attention
recipe's (frozen dino_say_vitb14, 7 slots of 128, SlotContrast, MLP decoder); YAML files hold only
what differs. ``${globals.X}`` interpolations let one global (``NUM_SLOTS``, ``SLOT_DIM``) drive
every component that needs it, so a sweep over ``globals.NUM_SLOTS`` changes them all.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from omegaconf import II

from core.data.config import DatasetConfig, FeatureCacheConfig


@dataclass
class GlobalsConfig:
    NUM_SLOTS: int = 7
    SLOT_DIM: int = 128
    SAYCAM_MODEL: str = "dino_say_vitb14"
    FEAT_DIM: int = 768
    BATCH_SIZE_PER_GPU: int = 16
    NUM_GPUS: int = 1


@dataclass
class TrainerConfig:
    """Step-based training. Intervals are in optimizer steps."""

    max_steps: int = 100_000
    gradient_clip_val: float = 0.05
    accelerator: str = "auto"
    devices: int = II("globals.NUM_GPUS")
    num_nodes: int = 1
    strategy: str = "auto"  # auto | ddp
    precision: str = "32"  # 32 | 16 | bf16 (or Lightning's 16-mixed, bf16-mixed, ...)
    val_check_interval: int = 2500
    checkpoint_every: int = 2500
    visualize_every: int = 5000
    log_every_n_steps: int = 50
    limit_val_batches: float = 1.0  # fraction (<= 1.0) or number of batches (> 1)
    gradient_checkpointing: bool = False
    use_optimizations: bool = False  # train --use-optimizations
    deterministic: bool = False


@dataclass
class BackboneConfig:
    name: str = "TimmEncoder"
    model: str = II("globals.SAYCAM_MODEL")
    frozen: bool = True
    weights: str = "pretrained"  # pretrained | random
    checkpoint: str | None = None  # .pth file, its folder, or a hub cache folder
    layer: int | None = None  # block whose output is the feature (None: the last)
    seed: int = 0  # weights=random: the backbone's own seed (trials of a sweep share it)
    # weights=random: 0 keeps timm's position embedding (std 0.02: the features barely say where
    # a patch is); s > 0 sets a fixed 2-D sine-cosine embedding times s (core/models/encoder.py)
    sincos_pos_embed: float = 0.0
    vit: dict[str, Any] = field(default_factory=dict)  # architecture overrides (tiny configs)


@dataclass
class OutputTransformConfig:
    name: str = "MLP"
    hidden_dim: int | None = None  # None: 2 * feature dim
    outp_dim: int = II("globals.SLOT_DIM")
    layer_norm: bool = True


@dataclass
class EncoderConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    output_transform: OutputTransformConfig = field(default_factory=OutputTransformConfig)
    learning_rate: float | None = None  # backbone lr when it is fine-tuned (frozen: false)


@dataclass
class InitializerConfig:
    name: str = "FixedLearnedInit"  # or RandomInit
    n_slots: int = II("globals.NUM_SLOTS")
    dim: int = II("globals.SLOT_DIM")
    frozen: bool = False


@dataclass
class GrouperConfig:
    name: str = "SlotAttention"
    inp_dim: int = II("globals.SLOT_DIM")
    slot_dim: int = II("globals.SLOT_DIM")
    n_iters: int = 3  # iterations on frames 1..T-1
    n_iters_first: int = 3  # iterations on frame 0
    eps: float = 1e-8
    mlp_ratio: int = 4
    frozen: bool = False


@dataclass
class PredictorConfig:
    name: str = "TransformerPredictor"  # or Identity
    dim: int = II("globals.SLOT_DIM")
    n_heads: int = 4
    ffn_ratio: int = 4
    n_blocks: int = 1
    # published: q k^T * sqrt(head_dim), as the published SlotContrast code computes it (a bug
    # there, kept as the default for parity); standard: q k^T / sqrt(head_dim)
    attention_scale: str = "published"
    frozen: bool = False


@dataclass
class DecoderConfig:
    name: str = "MLPDecoder"
    inp_dim: int = II("globals.SLOT_DIM")
    outp_dim: int = II("globals.FEAT_DIM")
    hidden_dims: list[int] = field(default_factory=lambda: [1024, 1024, 1024])
    split_first_layer: bool = True
    frozen: bool = False


@dataclass
class LossConfig:
    name: str = "MSELoss"
    temperature: float | None = None  # SlotSlotContrastLoss
    batch_contrast: bool | None = None  # SlotSlotContrastLoss: negatives from other videos too


# Each loss class (core.losses) by name, with the LossConfig settings it takes, so that a config
# is checked without importing torch; tests/core/test_config.py holds this to the constructors.
LOSS_SETTINGS: dict[str, tuple[str, ...]] = {
    "MSELoss": (),
    "FeatureReconstruction": (),
    "SlotSlotContrastLoss": ("temperature", "batch_contrast"),
}


def loss_settings(loss: LossConfig) -> dict[str, Any]:
    """The settings a loss block gives its class: every field but ``name`` that is set."""
    values = {f.name: getattr(loss, f.name) for f in fields(loss) if f.name != "name"}
    return {k: v for k, v in values.items() if v is not None}


def _default_losses() -> dict[str, LossConfig]:
    return {
        "loss_featrec": LossConfig(name="MSELoss"),
        "loss_ss": LossConfig(name="SlotSlotContrastLoss", temperature=0.1, batch_contrast=True),
    }


@dataclass
class ModelConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    initializer: InitializerConfig = field(default_factory=InitializerConfig)
    grouper: GrouperConfig = field(default_factory=GrouperConfig)
    predictor: PredictorConfig = field(default_factory=PredictorConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    losses: dict[str, LossConfig] = field(default_factory=_default_losses)
    loss_weights: dict[str, float] = field(
        default_factory=lambda: {"loss_featrec": 1.0, "loss_ss": 0.5}
    )
    mask_source: str = "decoder"  # masks scored by val metrics: decoder | attention


@dataclass
class ParamGroupConfig:
    regex: str = ".*"  # matched (re.match) against parameter names: encoder.*, grouper.*, ...
    lr: float | None = None
    weight_decay: float | None = None


@dataclass
class OptimizerConfig:
    name: str = "AdamW"
    lr: float = 4e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 2500
    decay: str = "exponential"  # exponential | cosine | none (after warm-up)
    decay_rate: float = 0.5  # exponential: factor per decay_steps
    decay_steps: int = 100_000  # = default max_steps; fixed: a longer resume keeps the schedule
    param_groups: list[ParamGroupConfig] = field(default_factory=list)


@dataclass
class MetricConfig:
    name: str = "VideoARI"  # VideoARI | VideoIoU
    ignore_background: bool = True
    matching: str | None = None  # VideoIoU: overlap | hungarian


# Each validation metric class (core.metrics.METRICS) by name, with the MetricConfig settings it
# takes, so that a config is checked without importing torch; tests/core/test_config.py holds this
# to the constructors.
METRIC_SETTINGS: dict[str, tuple[str, ...]] = {
    "VideoARI": ("ignore_background",),
    "VideoIoU": ("matching", "ignore_background"),
}


def metric_settings(metric: MetricConfig) -> dict[str, Any]:
    """The settings a metric block gives its class: those it takes that are set."""
    return {k: getattr(metric, k) for k in METRIC_SETTINGS[metric.name]
            if getattr(metric, k) is not None}


def _default_metrics() -> dict[str, MetricConfig]:
    return {
        "ari": MetricConfig(name="VideoARI", ignore_background=True),
        "mbo": MetricConfig(name="VideoIoU", matching="overlap", ignore_background=True),
    }


def _default_dataset() -> DatasetConfig:
    return DatasetConfig(batch_size=II("globals.BATCH_SIZE_PER_GPU"))  # type: ignore[arg-type]


@dataclass
class Config:
    """A whole run. ``experiment`` names its directory: ``<log_dir>/<experiment>/``."""

    experiment: str = "integrated_saycam"
    seed: int = 0
    globals: GlobalsConfig = field(default_factory=GlobalsConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=_default_dataset)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    val_metrics: dict[str, MetricConfig] = field(default_factory=_default_metrics)
    feature_cache: FeatureCacheConfig = field(default_factory=FeatureCacheConfig)


TOP_LEVEL_KEYS = tuple(Config.__dataclass_fields__)
MODEL_KEYS = tuple(ModelConfig.__dataclass_fields__)

"""The LightningModule: one model, weighted losses, validation FG-ARI / mBO, AdamW with warm-up."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from core.config import Config
from core.config.schema import metric_settings
from core.errors import NonFiniteLossError, SlotsweepError
from core.metrics import METRICS
from core.models.build import build_losses, build_model
from core.models.video import ATTN_MASKS, DECODER_MASKS, FEATURES, RECONSTRUCTION
from core.names import MASKS_KEY, METRIC_ARI, METRIC_MBO, TRAIN_LOSS, TRAIN_LR, VAL_LOSS, VIDEO_KEY
from core.training.fast import TOTAL_TERM, CompiledStep, DeferredFiniteCheck

ENCODER_PREFIX = "model.encoder."
ENCODER_INFO = "slotsweep_encoder"


def train_loss_key(name: str) -> str:
    """``loss_featrec`` -> ``train/loss/featrec`` (the loss block's name, namespaced)."""
    return f"{TRAIN_LOSS}/{name.removeprefix('loss_')}"


def val_metric_key(name: str) -> str:
    """``ari`` -> ``val/ari``."""
    return f"val/{name}"


assert val_metric_key("ari") == METRIC_ARI and val_metric_key("mbo") == METRIC_MBO

def lr_lambda(step: int, warmup: int, decay: str, decay_rate: float, decay_steps: int) -> float:
    """The learning-rate factor at optimizer step ``step`` (0-based), as published.

    SlotContrast / VideoSAUR (martius-lab/slotcontrast@17b42b0 ``schedulers.py``,
    ``exp_decay_with_warmup`` / ``cosine_decay_with_warmup``):

    - warm-up, ``step < warmup``: ``step / warmup`` (0 at the first step);
    - then exponential: ``decay_rate ** ((step - warmup) / (decay_steps - warmup))``, so the
      factor is 1 at the end of warm-up and ``decay_rate`` at ``decay_steps``;
    - or cosine: ``0.5 * (1 + cos(pi * min(step - warmup, decay_steps - warmup) /
      (decay_steps - warmup)))``, reaching 0 at ``decay_steps``;
    - or ``none``: 1 after warm-up.
    """
    if step < warmup:
        return step / warmup
    after, span = step - warmup, decay_steps - warmup
    if decay == "exponential":
        return decay_rate ** (after / span)
    if decay == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(after, span) / span))
    return 1.0


def param_groups(model: nn.Module, cfg: Config) -> list[dict]:
    """Trainable parameters grouped by the first matching regex (``optimizer.param_groups``).

    ``model.encoder.learning_rate`` is a group ``encoder\\..*`` ahead of the others. Parameters no
    regex matches use ``optimizer.lr``. Names are the model's own (``grouper.gru.weight_ih``).
    """
    opt = cfg.optimizer
    rules: list[tuple[str, float | None, float | None]] = []
    if cfg.model.encoder.learning_rate is not None:
        rules.append((r"encoder\.", cfg.model.encoder.learning_rate, None))
    rules += [(g.regex, g.lr, g.weight_decay) for g in opt.param_groups]
    buckets: list[list[Tensor]] = [[] for _ in range(len(rules) + 1)]
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        index = next((i for i, r in enumerate(rules) if re.match(r[0], name)), len(rules))
        buckets[index].append(param)
    groups = []
    for (regex, lr, wd), params in zip([*rules, (None, None, None)], buckets, strict=True):
        if params:
            groups.append({
                "params": params,
                "lr": opt.lr if lr is None else lr,
                "weight_decay": opt.weight_decay if wd is None else wd,
                "name": regex or "default",
            })
    return groups


class SlotModule(pl.LightningModule):
    """Trains :class:`core.models.video.SlotVideoModel` as the config says."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = build_model(cfg)
        self.losses = build_losses(cfg)
        self.weights = {k: float(w) for k, w in cfg.model.loss_weights.items() if w > 0}
        self.metrics = {name: METRICS.build(m.name, **metric_settings(m))
                        for name, m in cfg.val_metrics.items()}
        self._val_loss = [0.0, 0]
        self.last_visual: dict[str, Tensor] | None = None
        self._weights_hash: str | None = None
        # trainer.use_optimizations: the compiled training step (built at the first step, on the
        # device the module then lives on) and the on-device non-finite record (read by
        # core.training.fast.FiniteGuard). Neither is part of the state dict.
        self.fast_step: CompiledStep | None = None
        self.finite_check: DeferredFiniteCheck | None = None
        if cfg.trainer.use_optimizations:
            self.finite_check = DeferredFiniteCheck([*self.weights, TOTAL_TERM])
        self._lr_buffer: Tensor | None = None

    # ------------------------------------------------------------------ checkpoints
    def _encoder_from_file(self) -> bool:
        """A frozen backbone that can be built again is not stored in our checkpoints (344 MB
        for ViT-B): pretrained weights are reloaded from their file, random weights drawn again
        from ``model.encoder.backbone.seed``; either way checked by the weights hash."""
        b = self.cfg.model.encoder.backbone
        encoder = self.model.encoder
        rebuildable = b.weights in ("pretrained", "random")
        return b.frozen and rebuildable and hasattr(encoder, "weights_hash")

    def _encoder_hash(self) -> str:
        if self._weights_hash is None:
            self._weights_hash = self.model.encoder.weights_hash()
        return self._weights_hash

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if not self._encoder_from_file():
            return
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(ENCODER_PREFIX)]:
            del state[key]
        checkpoint[ENCODER_INFO] = {
            "dropped": True,
            "model": self.cfg.model.encoder.backbone.model,
            "weights_hash": self._encoder_hash(),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        info = checkpoint.get(ENCODER_INFO) or {}
        if not info.get("dropped"):
            return
        if info.get("weights_hash") != self._encoder_hash():
            raise SlotsweepError(
                f"the checkpoint was trained on {info.get('model')} weights "
                f"{info.get('weights_hash')} but the backbone loaded now has "
                f"{self._encoder_hash()}: point model.encoder.backbone.checkpoint at the same file "
                "(weights=random: use the same model.encoder.backbone.seed and architecture)"
            )
        state = checkpoint["state_dict"]
        for key, value in self.state_dict().items():
            if key.startswith(ENCODER_PREFIX):
                state.setdefault(key, value)

    # ------------------------------------------------------------------ steps
    def forward(self, batch: dict) -> dict:
        return self.model(batch)

    def _losses(self, outputs: dict) -> tuple[Tensor, dict[str, Tensor]]:
        terms = {name: self.losses[name](outputs) for name in self.weights}
        total = sum(self.weights[name] * value for name, value in terms.items())
        return total, terms  # type: ignore[return-value]

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        if self.cfg.trainer.use_optimizations:
            return self._fast_training_step(batch)
        outputs = self.model(batch)
        total, terms = self._losses(outputs)
        values = torch.stack([total, *terms.values()]).detach()
        if not bool(torch.isfinite(values).all()):  # one host sync; stops before the update
            bad = next((n for n, v in terms.items() if not torch.isfinite(v)), "total")
            raise NonFiniteLossError(self.global_step, bad, float(terms.get(bad, total).detach()))
        batch_size = batch[next(iter(batch))].shape[0]
        self.log(TRAIN_LOSS, total, prog_bar=True, batch_size=batch_size)
        for name, value in terms.items():
            self.log(train_loss_key(name), value, batch_size=batch_size)
        optimizer = self.trainer.optimizers[0] if self._trainer is not None else None
        if optimizer is not None:  # lr of the default group (the last one)
            self.log(TRAIN_LR, optimizer.param_groups[-1]["lr"], batch_size=batch_size)
        return total

    # ------------------------------------------------------------------ the fast step
    def train_losses(self, batch: dict) -> tuple[Tensor, Tensor]:
        """The training computation that ``use_optimizations`` compiles: model forward and
        weighted losses. Returns ``(total, values)``: the loss to backpropagate and the detached
        float32 vector ``[*terms, total]`` (the order of ``finite_check.names``)."""
        total, terms = self._losses(self.model(batch))
        values = torch.stack([v.detach().float() for v in (*terms.values(), total)])
        return total, values

    def _optimizer(self) -> torch.optim.Optimizer | None:
        if self._trainer is None or not self.trainer.optimizers:
            return None
        return self.trainer.optimizers[0]

    def _grad_scaler(self) -> bool:
        """Whether Lightning steps the optimizer through a GradScaler (precision 16-mixed)."""
        if self._trainer is None:
            return False
        return getattr(self.trainer.precision_plugin, "scaler", None) is not None

    def _fast_training_step(self, batch: dict) -> Tensor:
        """``use_optimizations``: compiled forward + losses (CUDA graphs on a GPU), no host
        synchronisation: the non-finite test is deferred to ``finite_check`` (the fused optimizer
        skips its update on device from a bad step on; FiniteGuard raises). With an optimizer
        that cannot skip (not fused) the step checks the losses every step as the plain one."""
        if self.fast_step is None:
            self.fast_step = CompiledStep(self.train_losses, self.device.type)
        total, values = self.fast_step(batch)
        # out of the CUDA-graph pool before the next replay overwrites them (clone keeps grad)
        total, values = total.clone(), values.clone()
        optimizer = self._optimizer()
        assert self.finite_check is not None
        if optimizer is None or self.finite_check.attach(optimizer):
            self.finite_check.update(values, self.global_step)
        elif not bool(torch.isfinite(values).all()):  # one host sync; stops before the update
            bad = next(i for i, v in enumerate(values.tolist()) if not math.isfinite(v))
            raise NonFiniteLossError(
                self.global_step, self.finite_check.names[bad], float(values[bad])
            )
        batch_size = batch[next(iter(batch))].shape[0]
        names = self.finite_check.names
        # no prog_bar: the progress bar turns its metrics into floats every step (a sync)
        self.log(TRAIN_LOSS, values[-1], batch_size=batch_size)
        for i, name in enumerate(names[:-1]):
            self.log(train_loss_key(name), values[i], batch_size=batch_size)
        if optimizer is not None:  # a device scalar: logging a float copies it host -> device
            if self._lr_buffer is None or self._lr_buffer.device != values.device:
                self._lr_buffer = torch.zeros((), dtype=torch.float32, device=values.device)
            self._lr_buffer.fill_(optimizer.param_groups[-1]["lr"])
            self.log(TRAIN_LR, self._lr_buffer, batch_size=batch_size)
        return total

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Lightning refuses to clip for a fused optimizer under mixed precision (it assumes a
        GradScaler unscales inside ``step``). With bf16 there is no scaler: the gradients are
        true gradients, so ``use_optimizations`` clips them here (same norm/value clipping)."""
        fused = getattr(optimizer, "_step_supports_amp_scaling", False)
        if not (gradient_clip_val and self.cfg.trainer.use_optimizations and fused
                and not self._grad_scaler()):
            super().configure_gradient_clipping(optimizer, gradient_clip_val,
                                                gradient_clip_algorithm)
            return
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if str(gradient_clip_algorithm or "norm").lower().endswith("value"):
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)

    def on_validation_epoch_start(self) -> None:
        for metric in self.metrics.values():
            metric.reset()
        self._val_loss = [0.0, 0]
        self.last_visual = None

    def _masks(self, outputs: dict) -> Tensor:
        key = DECODER_MASKS if self.cfg.model.mask_source == "decoder" else ATTN_MASKS
        masks = outputs[key]  # (B, T, K, P)
        h, w = self.model.grid_size
        return masks.unflatten(-1, (h, w)).float()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        outputs = self.model(batch)
        total, _ = self._losses(outputs)
        n = batch[VIDEO_KEY].shape[0] if VIDEO_KEY in batch else 1
        self._val_loss[0] += float(total) * n
        self._val_loss[1] += n
        if MASKS_KEY in batch:
            masks = self._masks(outputs)
            for metric in self.metrics.values():
                metric.update(masks, batch[MASKS_KEY])
            if batch_idx == 0 and VIDEO_KEY in batch:
                self.last_visual = {
                    "video": batch[VIDEO_KEY][0].cpu(),
                    "masks": masks[0].cpu(),
                    "features": outputs[FEATURES][0].float().cpu(),
                    "reconstruction": outputs[RECONSTRUCTION][0].float().cpu(),
                    "true": batch[MASKS_KEY][0].cpu(),
                }

    def _reduce(self, values: Sequence[float]) -> list[float]:
        """Sum per-rank values over all DDP ranks (plain floats in, plain floats out)."""
        if self.trainer.world_size <= 1:
            return list(values)
        t = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        return self.trainer.strategy.reduce(t, reduce_op="sum").tolist()

    def on_validation_epoch_end(self) -> None:
        stats = [self._val_loss[0], self._val_loss[1]]
        for metric in self.metrics.values():
            stats += [metric._sum, metric._count]
        stats = self._reduce(stats)
        if stats[1]:
            self.log(VAL_LOSS, stats[0] / stats[1], sync_dist=False)
        for i, name in enumerate(self.metrics):
            total, count = stats[2 + 2 * i], stats[3 + 2 * i]
            if count:
                self.log(val_metric_key(name), total / count, prog_bar=True, sync_dist=False)

    # ------------------------------------------------------------------ optimizer
    def configure_optimizers(self):
        opt = self.cfg.optimizer
        groups = param_groups(self.model, self.cfg)
        if not groups:
            raise SlotsweepError("no trainable parameters: every component is frozen")
        kwargs = {"betas": tuple(opt.betas)}
        if self.cfg.trainer.use_optimizations and not self._grad_scaler():
            # fused on CPU too: the deferred non-finite check skips steps through found_inf
            kwargs["fused"] = True
        optimizers = {"AdamW": torch.optim.AdamW, "Adam": torch.optim.Adam}
        if opt.name not in optimizers:
            raise SlotsweepError(
                f"unknown optimizer.name {opt.name!r}; valid: {', '.join(optimizers)}"
            )
        optimizer = optimizers[opt.name](groups, **kwargs)

        def schedule(step: int) -> float:
            return lr_lambda(step, opt.warmup_steps, opt.decay, opt.decay_rate, opt.decay_steps)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }

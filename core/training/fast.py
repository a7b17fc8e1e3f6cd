"""The fast training step of ``trainer.use_optimizations`` (``--use-optimizations``).

Three parts, each usable alone:

* :func:`compile_mode` / :class:`CompiledStep`: the training computation (model forward +
  weighted losses) under ``torch.compile(dynamic=False)``, with CUDA graphs
  (``mode="reduce-overhead"``) on a GPU. Where compiling is impossible (no C++ compiler, a
  dynamo or inductor failure) the step falls back to eager once, with a one-line warning.
  ``SLOTSWEEP_NO_COMPILE=1`` turns compiling off.
* :class:`DeferredFiniteCheck`: the "a loss became NaN / inf" test without a host
  synchronisation per step. A sticky on-device flag (plus the first bad step, term and value)
  is updated with tensor ops only; it is handed to a fused Adam/AdamW as ``found_inf`` (the
  GradScaler mechanism), so every optimizer update after a bad step is skipped on the device.
  :meth:`DeferredFiniteCheck.check` synchronises once and raises
  :class:`core.errors.NonFiniteLossError`.
* :class:`FiniteGuard`: the Lightning callback that calls that check every few steps and before
  anything is written (checkpoints, validation, end of training). It must come first in the
  callback list: Lightning calls callback hooks in list order.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor

from core.errors import NonFiniteLossError
from core.names import NO_COMPILE_ENV

TOTAL_TERM = "total"
_CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
_COMPILER_MODULES = ("torch._dynamo", "torch._inductor", "torch._functorch", "torch.fx")


def compile_enabled() -> bool:
    """False when ``SLOTSWEEP_NO_COMPILE`` is set to a true value (1, true, yes)."""
    return os.environ.get(NO_COMPILE_ENV, "").strip().lower() not in ("1", "true", "yes")


def compile_mode(device_type: str) -> str | None:
    """The ``torch.compile`` mode of the training step on a device type.

    ``"reduce-overhead"`` (inductor + CUDA graphs) on ``cuda``, ``"default"`` on ``cpu``, and
    ``None`` (run eagerly) on other devices or when ``SLOTSWEEP_NO_COMPILE=1``.
    """
    if not compile_enabled():
        return None
    return {"cuda": "reduce-overhead", "cpu": "default"}.get(device_type)


def is_compile_error(exc: BaseException) -> bool:
    """True for the errors of torch.compile itself (dynamo, AOTAutograd, inductor, a missing or
    broken C++ compiler), False for errors the function would raise eagerly too."""
    from torch._dynamo.exc import TorchDynamoException
    from torch._inductor.exc import InductorError

    if isinstance(exc, (TorchDynamoException, InductorError)):
        return True
    return type(exc).__module__.startswith(_COMPILER_MODULES)


def _reason(exc: BaseException) -> str:
    """``Type: first line`` of the innermost compiler error (BackendCompilerFailed wraps it)."""
    seen: set[int] = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "inner_exception", None) or exc.__cause__
        if not isinstance(inner, BaseException):
            break
        exc = inner
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    first = lines[0] if lines else ""
    return f"{type(exc).__name__}: {first}"[:240].rstrip(": ")


class CompiledStep:
    """``fn`` under ``torch.compile(dynamic=False, mode=compile_mode(device_type))``.

    Each call on a CUDA-graph mode starts with ``torch.compiler.cudagraph_mark_step_begin()``:
    the outputs of the previous call live in the graph's memory pool and are overwritten by this
    one, so a caller that keeps outputs across calls must ``clone()`` them (the training step
    clones its loss scalars). ``dynamic=False``: a new input shape (a smaller last batch) compiles
    and records once more instead of making every shape symbolic.

    If a call fails inside the compiler (no C++ compiler, a dynamo/inductor error) the step prints
    one line naming the reason to stderr and runs ``fn`` eagerly from then on. Errors that are
    not the compiler's propagate unchanged.

    Args:
        fn: the function to compile (its outputs: tensors or containers of tensors).
        device_type: ``"cuda"``, ``"cpu"``, ...: chooses the mode.
        mode: override the mode (``None``: run eagerly).
        name: what to call the function in the warning.
    """

    _AUTO: Any = object()

    def __init__(
        self,
        fn: Callable[..., Any],
        device_type: str,
        *,
        mode: str | None = _AUTO,
        name: str = "training step",
    ) -> None:
        self.fn, self.name = fn, name
        self.mode: str | None = compile_mode(device_type) if mode is self._AUTO else mode
        self.fallback_reason: str | None = None
        self._compiled: Callable[..., Any] | None = None
        if self.mode is not None:
            # inductor on a CPU-only machine warns "No CUDA runtime is found": not actionable
            logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
            self._compiled = torch.compile(fn, dynamic=False, mode=self.mode)

    @property
    def compiled(self) -> bool:
        """Whether calls go through ``torch.compile`` (False after a fallback)."""
        return self._compiled is not None

    @property
    def cuda_graphs(self) -> bool:
        """Whether the compiled function records / replays CUDA graphs."""
        return self.compiled and self.mode in _CUDA_GRAPH_MODES and torch.cuda.is_available()

    def fall_back(self, exc: BaseException) -> None:
        """Switch to eager for good and print the one-line warning."""
        self._compiled = None
        self.fallback_reason = _reason(exc)
        print(f"slotsweep: warning: torch.compile of the {self.name} failed "
              f"({self.fallback_reason}); running it eagerly", file=sys.stderr, flush=True)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._compiled is not None:
            if self.cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            try:
                return self._compiled(*args, **kwargs)
            except Exception as exc:
                if not is_compile_error(exc):
                    raise
                self.fall_back(exc)
        return self.fn(*args, **kwargs)


def _reads_found_inf(optimizer: Any) -> bool:
    """Whether ``optimizer.step`` reads ``optimizer.found_inf`` and skips on 1.0: the fused
    implementations of torch's Adam/AdamW (``_step_supports_amp_scaling``, the GradScaler
    contract). The foreach/for-loop paths refuse a ``found_inf``."""
    if not getattr(optimizer, "_step_supports_amp_scaling", False):
        return False
    defaults = getattr(optimizer, "defaults", {})
    groups = getattr(optimizer, "param_groups", [])
    return bool(defaults.get("fused")) and all(g.get("fused", True) for g in groups)


class DeferredFiniteCheck:
    """A sticky on-device record of the first non-finite loss, read once in a while.

    :meth:`update` runs inside the training step with tensor ops only (no ``.item()``,
    ``bool()``, ``float()`` of a device tensor): the flag ``found_inf`` becomes 1.0 when any of
    the values is NaN or infinite and stays 1.0; the step, term index and value of the first such
    step are kept. :meth:`attach` hands the flag to a fused Adam/AdamW as ``found_inf``, so that
    optimizer skips every update from the bad step on (its step counters do not advance either).
    :meth:`check` synchronises once and raises ``NonFiniteLossError(step, term, value)``.

    Args:
        names: the name of each entry of the ``values`` vector given to :meth:`update`, e.g.
            ``["loss_featrec", "loss_ss", "total"]``; the first non-finite one is reported.
    """

    def __init__(self, names: Sequence[str]) -> None:
        if not names:
            raise ValueError("DeferredFiniteCheck needs at least one value name")
        self.names = list(names)
        self.found_inf: Tensor | None = None  # float32 0-d: 0.0, or 1.0 once a value was bad
        self.step: Tensor | None = None  # int64 0-d: the first bad step (-1: none)
        self.index: Tensor | None = None  # int64 0-d: index into names of the first bad value
        self.value: Tensor | None = None  # float32 0-d: that value (nan, inf or -inf)

    def _ensure(self, device: torch.device) -> None:
        if self.found_inf is not None and self.found_inf.device == device:
            return
        if self.found_inf is None:
            self.found_inf = torch.zeros((), dtype=torch.float32, device=device)
            self.step = torch.full((), -1, dtype=torch.int64, device=device)
            self.index = torch.zeros((), dtype=torch.int64, device=device)
            self.value = torch.zeros((), dtype=torch.float32, device=device)
        else:  # moved (rare): carry the record over
            self.found_inf, self.step, self.index, self.value = (
                t.to(device) for t in (self.found_inf, self.step, self.index, self.value)
            )

    def update(self, values: Tensor, step: int) -> None:
        """Record ``values`` (one entry per name) of training step ``step``; no host sync."""
        values = values.detach().float().reshape(-1)
        if values.numel() != len(self.names):
            raise ValueError(f"expected {len(self.names)} values ({', '.join(self.names)}), "
                             f"got {values.numel()}")
        self._ensure(values.device)
        assert self.found_inf is not None and self.step is not None
        assert self.index is not None and self.value is not None
        bad = ~torch.isfinite(values)
        now = bad.any()
        first = now & (self.found_inf == 0)  # this step is the first bad one
        index = bad.to(torch.uint8).argmax()  # the first bad entry (argmax returns the first max)
        self.step.masked_fill_(first, step)
        self.index.copy_(torch.where(first, index, self.index))
        self.value.copy_(torch.where(first, values.index_select(0, index.view(1))[0], self.value))
        self.found_inf.copy_(torch.maximum(self.found_inf, now.float()))

    @staticmethod
    def supports(optimizer: Any) -> bool:
        """Whether ``optimizer`` can skip its updates on the flag (a fused torch Adam/AdamW)."""
        return _reads_found_inf(optimizer)

    def attach(self, optimizer: Any, device: torch.device | str | None = None) -> bool:
        """Give ``optimizer`` the flag as its ``found_inf``; False (nothing done) when it
        cannot skip on it. Cheap: call it every step (a GradScaler deletes the attribute)."""
        if not self.supports(optimizer):
            return False
        if self.found_inf is None:
            if device is None:
                device = next(p.device for g in optimizer.param_groups for p in g["params"])
            self._ensure(torch.device(device))
        if getattr(optimizer, "found_inf", None) is not self.found_inf:
            optimizer.found_inf = self.found_inf
        return True

    def is_set(self) -> bool:
        """Whether a non-finite value was recorded (one host sync)."""
        return self.found_inf is not None and bool(self.found_inf.item() != 0.0)

    def error(self, default_step: int = -1) -> Exception | None:
        """The ``NonFiniteLossError`` describing the first bad value, or None (one sync)."""
        if not self.is_set():
            return None
        assert self.step is not None and self.index is not None and self.value is not None
        step, index = int(self.step.item()), int(self.index.item())
        return NonFiniteLossError(step if step >= 0 else default_step, self.names[index],
                                  float(self.value.item()))

    def check(self, default_step: int = -1) -> None:
        """Raise ``NonFiniteLossError(step, term, value)`` if a value was non-finite."""
        error = self.error(default_step)
        if error is not None:
            raise error

    def reset(self) -> None:
        """Forget the record (the attached optimizer steps again)."""
        for t in (self.found_inf, self.value, self.index):
            if t is not None:
                t.zero_()
        if self.step is not None:
            self.step.fill_(-1)


class FiniteGuard(pl.Callback):
    """Raises the deferred ``NonFiniteLossError`` of the module's :class:`DeferredFiniteCheck`
    (its ``finite_check`` attribute; a module without one is left alone).

    Checks (one host sync each) at the end of every training batch whose step is a multiple of
    one of ``intervals`` (default: ``trainer.log_every_n_steps`` and the module's
    ``cfg.trainer.checkpoint_every`` / ``val_check_interval``) or the last step, at the start of
    validation, at the end of training, and before any checkpoint is written. Put it first in
    the Trainer's callbacks so its hooks run before the checkpoint writers'. With several
    processes the flag is combined over ranks (every rank raises together).
    """

    def __init__(self, *intervals: int) -> None:
        self.intervals = tuple(int(i) for i in intervals if int(i) > 0)

    def _intervals(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[int, ...]:
        if self.intervals:
            return self.intervals
        found = [getattr(trainer, "log_every_n_steps", 0)]
        t = getattr(getattr(pl_module, "cfg", None), "trainer", None)
        if t is not None:
            found += [t.checkpoint_every, t.val_check_interval]
        return tuple(int(i) for i in found if i and int(i) > 0) or (1,)

    @staticmethod
    def _check(trainer: pl.Trainer, pl_module: pl.LightningModule, collective: bool) -> None:
        finite = getattr(pl_module, "finite_check", None)
        if finite is None:
            return
        bad = finite.is_set()
        if collective and trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if not bad:
            return
        error = finite.error(trainer.global_step)
        if error is None:  # another rank diverged
            error = NonFiniteLossError(trainer.global_step, "(on another rank)", float("nan"))
        raise error

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        last = trainer.max_steps is not None and 0 < trainer.max_steps <= step
        if last or any(step % i == 0 for i in self._intervals(trainer, pl_module)):
            self._check(trainer, pl_module, collective=True)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._check(trainer, pl_module, collective=True)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check(trainer, pl_module, collective=True)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Local only: a checkpoint may be written by rank 0 alone (no collective here). Raising
        # here stops Trainer.save_checkpoint before the file is written.
        self._check(trainer, pl_module, collective=False)

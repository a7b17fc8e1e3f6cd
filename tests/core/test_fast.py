"""The fast step of ``trainer.use_optimizations`` on a CPU: compiled numerics against the plain
step, the deferred non-finite check (fused AdamW skips on device), no host sync in the step."""

from __future__ import annotations

import contextlib
import math
import subprocess
import sys
from collections.abc import Sequence
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch

from core.config import load_config
from core.errors import NonFiniteLossError
from core.names import FEATURE_CACHE_ENV
from core.train import train
from core.training.checkpoint import read_checkpoint
from core.training.fast import (
    CompiledStep,
    DeferredFiniteCheck,
    FiniteGuard,
    compile_mode,
    is_compile_error,
)
from core.training.module import SlotModule

FAST = ["trainer.use_optimizations=true"]
SYNCS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")


def _cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.getbasetemp() / "cache")


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    """Generated data goes to one per-session cache, not the user's home."""
    monkeypatch.setenv("SLOTSWEEP_CACHE", _cache_dir(tmp_path_factory))
    monkeypatch.delenv("SLOTSWEEP_NO_COMPILE", raising=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 4-step optimized ``train()`` run and the same plain run (the one compile of this
    file: the later tests reuse its compiled step, whose shapes and batch keys they share).

    The guard checks at the last step only, so steps 2 and 3 (after the step that compiles) are
    watched for host syncs from the start to the end of the training batch.
    """
    quiet = ["trainer.max_steps=4", "trainer.log_every_n_steps=100",
             "trainer.checkpoint_every=100", "trainer.val_check_interval=100"]
    root = tmp_path_factory.mktemp("runs")
    fast, plain = Recorder(armed_steps=(1, 2)), Recorder()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLOTSWEEP_CACHE", _cache_dir(tmp_path_factory))
        # frames, never a cache, in these runs
        mp.setenv(FEATURE_CACHE_ENV, str(root / "feature-cache"))
        mp.delenv("SLOTSWEEP_NO_COMPILE", raising=False)
        result = train(load_config("tiny", [*quiet, *FAST]), [fast], run_dir=root / "fast",
                       progress_bar=False)
        train(load_config("tiny", quiet), [plain], run_dir=root / "plain", progress_bar=False)
    return SimpleNamespace(result=result, fast=fast, plain=plain)


@pytest.fixture
def fast_module(runs):
    """The optimized run's module (compiled step reused), off its Trainer, and a real batch."""
    module = runs.fast.module
    module.trainer = None
    module.zero_grad(set_to_none=True)
    return module, runs.fast.batch


@contextlib.contextmanager
def no_host_sync(armed: list[bool] | None = None):
    """Tensor -> Python conversions (the host syncs of a GPU step) raise while ``armed[0]``."""
    armed = [True] if armed is None else armed
    originals = {name: getattr(torch.Tensor, name) for name in SYNCS}

    def guard(name):
        def raising(self, *args, **kwargs):
            if armed[0]:
                raise AssertionError(f"host sync: Tensor.{name} inside the step")
            return originals[name](self, *args, **kwargs)
        return raising

    try:
        for name in SYNCS:
            setattr(torch.Tensor, name, guard(name))
        yield armed
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


def test_compile_mode_and_the_no_compile_switch(monkeypatch):
    assert compile_mode("cuda") == "reduce-overhead" and compile_mode("cpu") == "default"
    assert compile_mode("mps") is None
    monkeypatch.setenv("SLOTSWEEP_NO_COMPILE", "1")
    assert compile_mode("cuda") is None
    step = CompiledStep(lambda x: x * 2, "cpu")
    assert not step.compiled and float(step(torch.ones(()))) == 2.0


def test_a_compiler_failure_falls_back_to_eager_once(capsys):
    import torch._inductor.config as inductor_config

    calls = []

    def fn(x):
        calls.append(1)
        return (x.cos() * 3.5).sum()

    step = CompiledStep(fn, "cpu")
    no_compiler = {"cpp.cxx": (None, "no-such-c++-compiler"), "force_disable_caches": True}
    with inductor_config.patch(no_compiler):
        assert float(step(torch.zeros(4))) == 14.0 and float(step(torch.zeros(4))) == 14.0
    assert not step.compiled and "C++ compiler" in step.fallback_reason
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith("slotsweep:")]
    assert len(ours) == 1 and "no-such-c++-compiler" in ours[0] and "eagerly" in ours[0], err
    assert "Traceback" not in err
    # an error of the function itself is not the compiler's: it propagates unchanged
    step = CompiledStep(fn, "cpu")
    step._compiled = lambda x: (_ for _ in ()).throw(ValueError("bad input"))
    with pytest.raises(ValueError, match="bad input"):
        step(torch.zeros(()))
    assert step.compiled and not is_compile_error(ValueError("x"))


def test_compiled_loss_and_gradients_match_the_plain_step(fast_module):
    module, batch = fast_module
    plain = SlotModule(load_config("tiny"))
    plain.load_state_dict(module.state_dict())
    with pytest.warns(UserWarning, match="self.log"):
        fast_loss = module.training_step(batch, 0)
        plain_loss = plain.training_step(batch, 0)
    fast_loss.backward()
    plain_loss.backward()
    torch.testing.assert_close(fast_loss, plain_loss, rtol=1e-5, atol=1e-6)
    _, values = module.train_losses(batch)  # [featrec, ss, total], as the plain terms
    _, terms = plain._losses(plain.model(batch))
    torch.testing.assert_close(values[:-1], torch.stack(list(terms.values())).detach(),
                               rtol=1e-5, atol=1e-6)
    graded = 0
    for (name, p), (_, q) in zip(module.named_parameters(), plain.named_parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), name
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
            graded += 1
    assert graded > 10
    module.zero_grad(set_to_none=True)
    assert not module.finite_check.is_set()


def test_no_host_sync_inside_the_optimized_step(fast_module):
    module, batch = fast_module
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad],
                                  lr=1e-3, fused=True)
    check = DeferredFiniteCheck(module.finite_check.names)
    assert check.attach(optimizer)
    with pytest.warns(UserWarning, match="self.log"), no_host_sync():
        loss = module.training_step(batch, 0)
        loss.backward()
        check.update(torch.stack([loss.detach()] * 3), step=0)
        torch.nn.utils.clip_grad_norm_([p for p in module.parameters() if p.grad is not None],
                                       0.05)
        optimizer.step()
        optimizer.zero_grad()
    assert not check.is_set() and not module.finite_check.is_set()


@pytest.mark.parametrize("name", ["AdamW", "Adam"])
def test_deferred_check_skips_the_fused_update_and_raises_later(name):
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2)
    optimizer = getattr(torch.optim, name)(layer.parameters(), lr=0.1, weight_decay=0.1,
                                           fused=True)
    check = DeferredFiniteCheck(["loss_featrec", "loss_ss", "total"])
    assert check.attach(optimizer) and optimizer.found_inf is check.found_inf

    def step(values: list[float], index: int) -> dict[str, torch.Tensor]:
        before = {k: v.clone() for k, v in layer.state_dict().items()}
        layer(torch.randn(4, 3)).square().sum().backward()
        with no_host_sync():
            check.update(torch.tensor(values), index)
            optimizer.step()
        optimizer.zero_grad()
        return before

    before = step([1.0, 2.0, 3.0], 0)
    assert not torch.equal(before["weight"], layer.weight) and not check.is_set()
    steps = [float(s["step"]) for s in optimizer.state.values()]
    before = step([1.0, math.nan, math.nan], 1)  # loss_ss is the first bad term
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())
    before = step([1.0, 2.0, 3.0], 2)  # sticky: still skipped although finite again
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())
    assert [float(s["step"]) for s in optimizer.state.values()] == steps
    with pytest.raises(NonFiniteLossError, match="loss loss_ss became nan at step 1") as info:
        check.check()
    assert (info.value.step, info.value.term) == (1, "loss_ss")
    check.reset()
    check.check()
    step([math.inf, 1.0, math.inf], 3)
    with pytest.raises(NonFiniteLossError, match="loss_featrec became inf at step 3"):
        check.check()
    # a non-fused optimizer cannot skip: it is left alone (the step checks every loss instead)
    plain = torch.optim.AdamW(layer.parameters(), foreach=True)
    assert not check.attach(plain) and not hasattr(plain, "found_inf")


class Recorder(pl.Callback):
    """Losses of every step; in the steps starting at ``armed_steps``, a Tensor -> Python
    conversion between the start and the end of the training batch (forward, backward,
    clipping, optimizer step, the callbacks before this one) raises."""

    def __init__(self, armed_steps: Sequence[int] = ()) -> None:
        self.armed_steps, self.losses, self.module = set(armed_steps), [], None
        self.batch: dict | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.metrics: dict[str, float] = {}
        self.armed = [False]
        self._patch: contextlib.ExitStack | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        self.module = pl_module
        if self.armed_steps:
            self._patch = contextlib.ExitStack()
            self._patch.enter_context(no_host_sync(self.armed))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.batch is None:
            self.batch = {k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()}
        self.armed[0] = trainer.global_step in self.armed_steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.armed[0] = False
        self.losses.append(float(outputs["loss"]))

    def on_fit_end(self, trainer, pl_module) -> None:
        self.optimizer = trainer.optimizers[0]
        self.metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        if self._patch is not None:
            self._patch.close()


def test_optimized_train_run_is_close_to_the_plain_one_and_never_syncs_in_a_step(runs):
    fast, plain, result = runs.fast, runs.plain, runs.result
    assert fast.armed == [False] and fast.armed_steps == {1, 2}  # the no-sync watch ran
    assert result["global_step"] == 4 and len(fast.losses) == 4
    assert fast.module.fast_step.compiled and fast.module.fast_step.fallback_reason is None
    optimizer = fast.optimizer
    assert optimizer.defaults["fused"] and optimizer.found_inf is fast.module.finite_check.found_inf
    assert not plain.optimizer.defaults["fused"] and not hasattr(plain.optimizer, "found_inf")
    assert fast.losses == pytest.approx(plain.losses, rel=1e-4)
    assert plain.losses[-1] < plain.losses[0]
    for key in ("train/loss", "train/loss/featrec", "train/loss/ss", "train/lr", "val/ari"):
        assert key in result["metrics"], key
    # the lr is logged from a device scalar: the plain run's value
    assert result["metrics"]["train/lr"] == pytest.approx(plain.metrics["train/lr"], rel=1e-6)


class PoisonBatch(pl.Callback):
    """Fills the input of one step with NaN (the weights stay finite: the update is skipped)."""

    def __init__(self, step: int) -> None:
        self.step, self.module = step, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.module = pl_module
        if trainer.global_step == self.step:
            batch["video"].fill_(float("nan"))


def test_non_finite_loss_raises_at_the_next_check_before_any_checkpoint(tmp_path):
    # checks every 2 steps: NaN at step 2, step 3 runs (skipped on device), raised at 4
    cfg = load_config("tiny", [*FAST, "trainer.max_steps=6", "trainer.checkpoint_every=2",
                               "trainer.log_every_n_steps=2", "trainer.val_check_interval=6"])
    poison = PoisonBatch(2)
    with pytest.raises(NonFiniteLossError) as info:
        train(cfg, [poison], run_dir=tmp_path / "nan", progress_bar=False)
    message = str(info.value)
    assert "loss loss_featrec became nan at step 2" in message, message
    assert "optimizer.lr=0.0001" in message
    ckpts = sorted(p.name for p in (tmp_path / "nan" / "checkpoints").glob("*.ckpt"))
    assert ckpts == ["step=2.ckpt"]
    saved = read_checkpoint(tmp_path / "nan" / "checkpoints" / "step=2.ckpt")["state_dict"]
    now = poison.module.state_dict()
    assert all(torch.isfinite(v).all() for v in saved.values() if v.is_floating_point())
    for key, value in saved.items():  # steps 2 and 3 were skipped: the weights of step 2
        assert torch.equal(value, now[key]), key


def test_guard_checks_at_its_intervals_and_before_any_checkpoint():
    module = SlotModule(load_config("tiny", [*FAST, "trainer.log_every_n_steps=4",
                                             "trainer.checkpoint_every=6"]))
    guard = FiniteGuard()
    trainer = SimpleNamespace(global_step=5, world_size=1, max_steps=100, log_every_n_steps=4,
                              sanity_checking=False)
    guard.on_train_batch_end(trainer, module, None, None, 0)  # nothing recorded: no error
    module.finite_check.update(torch.tensor([math.nan, 1.0, math.nan]), 5)
    guard.on_train_batch_end(trainer, module, None, None, 0)  # 5: not a multiple of 4 or 6
    for hook, step in (("on_save_checkpoint", 5), ("on_validation_start", 5),
                       ("on_train_end", 5), ("on_train_batch_end", 6), ("on_train_batch_end", 8),
                       ("on_train_batch_end", 100)):
        trainer.global_step = step
        args = {"on_save_checkpoint": ({},), "on_train_batch_end": (None, None, 0)}.get(hook, ())
        with pytest.raises(NonFiniteLossError, match="loss_featrec became nan at step 5"):
            getattr(guard, hook)(trainer, module, *args)
    plain = SlotModule(load_config("tiny"))  # use_optimizations off: the guard does nothing
    assert plain.finite_check is None
    guard.on_train_end(trainer, plain)


def test_bf16_clipping_with_a_fused_optimizer(tmp_path, monkeypatch):
    """Lightning refuses to clip for a fused optimizer under mixed precision; the module clips
    itself (bf16 has no scaler). Eager here: the compiled path is covered above."""
    monkeypatch.setenv("SLOTSWEEP_NO_COMPILE", "1")
    cfg = load_config("tiny", [*FAST, "trainer.precision=bf16", "trainer.max_steps=1",
                               "trainer.gradient_clip_val=0.05"])
    rec = Recorder()
    result = train(cfg, [rec], run_dir=tmp_path / "bf16", progress_bar=False)
    assert result["global_step"] == 1 and not rec.module.fast_step.compiled
    assert rec.module.trainer.optimizers[0].defaults["fused"]


def test_cli_divergence_with_use_optimizations_is_exit_3(tmp_path, capsys):
    from core.cli import train_main

    argv = ["tiny", "--log-dir", str(tmp_path), "optimizer.lr=1e30", "trainer.max_steps=4",
            "--use-optimizations"]
    assert train_main(argv) == 3
    err = capsys.readouterr().err
    assert "slotsweep: training stopped: loss loss_featrec became nan at step 2: " in err, err
    # the published warm-up gives step 0 a learning rate of 0 (tiny warms up for 1 step), so the
    # first update is step 1's and its loss is the last finite one: nothing saved after step 2
    step_ckpts = sorted(p.name for p in (tmp_path / "tiny" / "checkpoints").glob("step=*.ckpt"))
    assert step_ckpts == ["step=1.ckpt", "step=2.ckpt"]


def test_the_fast_step_imports_without_the_module_it_serves():
    """No import loop: fast.py stands below module.py (its error lives in core.errors)."""
    code = ("import sys, core.training.fast\n"
            "assert 'core.training.module' not in sys.modules\n"
            "from core.errors import NonFiniteLossError as E; import core.training.module as m\n"
            "assert m.NonFiniteLossError is E and core.training.fast.NonFiniteLossError is E\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)

"""Ray's lines in the sweep's terminal: a failed trial is one line with slotsweep's reason, and
the notices that do not apply to a sweep are dropped."""

from __future__ import annotations

import logging

from core.errors import SlotsweepError
from orchestrator.ray_logs import quiet_ray


class _WrappedError(RuntimeError):  # as Ray's RayTaskError: the trial's exception as .cause
    def __init__(self, cause: BaseException) -> None:
        super().__init__(f"ray::ImplicitFunc.train()\nTraceback ...\n{cause!r}")
        self.cause = cause


def _emit(logger: str, message: str, exc: BaseException | None = None) -> list[str]:
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(self.format(record))

    target = logging.getLogger(logger)
    handler = Keep()
    target.addHandler(handler)
    try:
        target.error(message, exc_info=(type(exc), exc, None) if exc else None)
    finally:
        target.removeHandler(handler)
    return seen


def test_a_failed_trial_is_one_line_with_its_reason_and_notices_are_dropped():
    quiet_ray()
    quiet_ray()  # idempotent
    controller = "ray.tune.execution.tune_controller"
    assert len(logging.getLogger(controller).filters) == 1
    reason = SlotsweepError("could not write checkpoint step=8.ckpt (No space left on device)")
    (line,) = _emit(controller, "Trial task failed for trial run_trial_0", _WrappedError(reason))
    assert line == ("Trial task failed for trial run_trial_0: could not write checkpoint "
                    "step=8.ckpt (No space left on device)")
    (other,) = _emit(controller, "Trial task failed for trial t", _WrappedError(ValueError("bad")))
    assert other.endswith(": ValueError('bad')") and "\n" not in other  # last line of its text
    assert _emit("ray._private.authentication.authentication_token_setup",
                 "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE...") == []
    assert _emit("ray.tune.tune", "Experiment has been interrupted, but ... Tuner.restore") == []
    assert _emit("ray.tune.tune", "Trials did not complete: [t]") != []  # others pass

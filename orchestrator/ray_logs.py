"""Ray's log lines in the sweep's terminal, made fit for a researcher: each filter says why the
line it changes is noise here. Installed by the sweep's driver before Ray starts."""

from __future__ import annotations

import logging


class _OneLineTrialFailure(logging.Filter):
    """Tune logs a failed trial with the trial's whole traceback (40 lines of Ray frames around
    one of slotsweep's one-line errors): keep its line, with the reason instead of the traceback
    (the traceback stays in the trial's ``error.txt`` in Tune's folder)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.getMessage().startswith("Trial task failed"):
            from orchestrator.results import trial_error

            record.msg = f"{record.getMessage()}: {trial_error(record.exc_info[1])}"
            record.args, record.exc_info, record.exc_text = (), None, None
        return True


class _DropNotice(logging.Filter):
    """Drops a library's log records that start with ``prefix`` (each use says why)."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def _add_once(logger: logging.Logger, new: logging.Filter) -> None:
    """Adds ``new`` to ``logger`` unless an equal filter (same class, same settings) is there."""
    if not any(isinstance(f, type(new)) and vars(f) == vars(new) for f in logger.filters):
        logger.addFilter(new)


def _drop(logger: str, prefix: str) -> None:
    _add_once(logging.getLogger(logger), _DropNotice(prefix))


def quiet_ray() -> None:
    """Ray at WARNING, and its notices that do not apply to a slotsweep sweep dropped or cut
    to one line (idempotent: a second sweep in the same process adds nothing)."""
    logging.getLogger("ray").setLevel(logging.WARNING)
    # Ray 2.60 turns token authentication on for every new local instance and says so, with
    # how to turn it off, on every sweep: slotsweep keeps it on, so the advice is noise here
    # (setting RAY_AUTH_MODE=token ourselves would silence it, but Ray reads the mode once at
    # import and its client then sends no token to its own GCS)
    _drop("ray._private.authentication.authentication_token_setup",
          "Token authentication is enabled")
    # Tune's "Resume experiment with: Tuner.restore(path=..., trainable=...)" after Ctrl-C is
    # Python for a Tune user; the sweep prints its own command line to finish it (--resume)
    _drop("ray.tune.tune", "Experiment has been interrupted")
    _add_once(logging.getLogger("ray.tune.execution.tune_controller"), _OneLineTrialFailure())

"""Sweep files: loading, complete validation (one-line errors), overrides, Ray Tune pieces."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from core.config import flatten, load_config
from core.errors import ConfigError
from orchestrator import spec_check as C
from orchestrator.search import (
    make_scheduler,
    make_search_alg,
    num_samples,
    param_space,
    trial_overrides,
    trial_resources,
    tune_config,
)
from orchestrator.spec import load_sweep, sweep_key, to_dict, to_yaml
from orchestrator.spec_check import check_cluster, grid_size

SWEEPS = Path(__file__).resolve().parents[2] / "sweeps"
QUICK = yaml.safe_load((SWEEPS / "quickstart.yaml").read_text())


def write(tmp_path: Path, **changes) -> Path:
    """The quickstart sweep with top-level fields changed (None deletes one)."""
    data = {**QUICK, **changes}
    data = {k: v for k, v in data.items() if v is not None or k in ("storage", "data_dir")}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def error(path: Path, *overrides: str) -> str:
    """The one-line message of the ConfigError that loading ``path`` raises."""
    with pytest.raises(ConfigError) as info:
        load_sweep(path, overrides)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def search(**dists) -> dict:
    return {k.replace("__", "."): v for k, v in dists.items()}


# --------------------------------------------------------------------------- shipped files
def test_shipped_sweeps_validate_without_torch_ray_or_weights():
    code = (
        "import sys; from orchestrator.spec import load_sweep\n"
        "from orchestrator.search import num_samples, trial_overrides\n"
        "q = load_sweep('sweeps/quickstart.yaml'); s = load_sweep('saycam_slots')\n"
        "assert (q.trials, q.concurrency, s.trials, s.algorithm.name) == (4, 2, 32, 'optuna')\n"
        "assert num_samples(q) == 4 and trial_overrides(q, {'seed': 1}) == ['seed=1']\n"
        "heavy = [m for m in ('torch', 'ray', 'timm', 'pytorch_lightning') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    root = SWEEPS.parent
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True, timeout=60)


def test_quickstart_fields_and_derived_values():
    spec = load_sweep(SWEEPS / "quickstart.yaml")
    assert spec.base == "tiny.yml" and spec.scheduler.name == "none"
    assert spec.resources.workers == 1 and Path(spec.storage).is_absolute()
    assert grid_size(spec) is None and num_samples(spec) == 4
    assert C.max_steps(spec) == 8
    saycam = load_sweep("saycam_slots")
    assert saycam.resources.gpus_per_trial == 1 and C.max_steps(saycam) == 20000


def test_round_trip_through_yaml(tmp_path):
    spec = load_sweep("quickstart")
    path = tmp_path / "recorded.yaml"
    path.write_text(to_yaml(spec))
    assert to_dict(load_sweep(path)) == to_dict(spec)


def test_sweep_key_is_stable_and_names_the_sweep(tmp_path):
    a, b = load_sweep("quickstart"), load_sweep("quickstart")
    assert sweep_key(a) == sweep_key(b) and len(sweep_key(a)) == 12
    assert sweep_key(load_sweep("quickstart", ["name=other"])) != sweep_key(a)
    assert sweep_key(load_sweep("quickstart", [f"storage={tmp_path}"])) != sweep_key(a)


# --------------------------------------------------------------------------- file and fields
def test_missing_file_and_bad_yaml(tmp_path):
    assert "does not exist; shipped sweeps: quickstart, saycam_slots" in error(tmp_path / "no.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    assert "is not valid YAML" in error(bad)


def test_unknown_sweep_field_suggests(tmp_path):
    assert "unknown sweep field 'trails' (did you mean trials?)" in error(write(tmp_path, trails=4))
    res = {"cpus_per_trial": 1, "gpu_per_trial": 0}
    assert "(did you mean resources.gpus_per_trial?)" in error(write(tmp_path, resources=res))


def test_required_fields_and_types(tmp_path):
    assert "has no name" in error(write(tmp_path, name=None))
    assert "sweep field trials must be an int, got 'many'" in error(write(tmp_path, trials="many"))
    assert "may only use letters" in error(write(tmp_path, name="a b"))


def test_field_shapes_nulls_and_strings(tmp_path):
    """OmegaConf's errors come back as one line naming the field; null keeps a section's
    defaults; a string field keeps the command line's text as it is."""
    assert "sweep field resources must be a mapping, got 3" in error(write(tmp_path, resources=3))
    assert "sweep field search must be a mapping, got [1]" in error(write(tmp_path, search=[1]))
    message = error(write(tmp_path, resources={"cpus_per_trial": "x"}))
    assert "sweep field resources.cpus_per_trial must be a number, got 'x'" in message
    message = error(write(tmp_path, overrides="x"))
    assert "sweep field overrides must be a list of strings, got 'x'" in message
    path = tmp_path / "nulls.yaml"
    path.write_text(yaml.safe_dump({**QUICK, "resources": None, "scheduler": None}))
    spec = load_sweep(path, ["name=007", "mlflow.experiment=1e3"])
    assert (spec.resources.cpus_per_trial, spec.scheduler.name) == (1, "none")
    assert (spec.name, spec.mlflow.experiment) == ("007", "1e3")


def test_overrides_keep_config_interpolations(tmp_path):
    """``overrides`` and ``search`` are free-form: a ${...} in them is the run config's."""
    item = "trainer.visualize_every=${trainer.val_check_interval}"
    spec = load_sweep(write(tmp_path, overrides=[*QUICK["overrides"], item]))
    assert spec.overrides[-1] == item
    assert load_config(spec.base, spec.overrides).trainer.visualize_every == 4


def test_base_config_missing_and_bad_overrides(tmp_path):
    message = error(write(tmp_path, base="nope.yml"))
    assert message.startswith(str(tmp_path))
    assert "base: config file nope.yml does not exist" in message
    assert "integrated_saycam.yml" in message  # lists the shipped configs
    message = error(write(tmp_path, overrides=["trainer.max_step=3"]))
    assert "overrides: unknown config key 'trainer.max_step'" in message
    assert "did you mean trainer.max_steps" in message


# --------------------------------------------------------------------------- search
def test_unknown_search_key_suggests(tmp_path):
    message = error(write(tmp_path, search={"globals.NUM_SLOT": {"choice": [3]}}))
    assert "search key 'globals.NUM_SLOT' is not a config key" in message
    assert message.endswith("(did you mean globals.NUM_SLOTS?)")
    message = error(write(tmp_path, search={"model.loss_weights.loss_s": {"uniform": [0.1, 1]}}))
    assert "did you mean model.loss_weights.loss_ss?" in message


def test_keys_under_dicts_and_shorthand_are_search_keys(tmp_path):
    dists = {"loss_weights.loss_featrec": {"uniform": [0.5, 1.0]},
             "grouper.n_iters": {"randint": [1, 4]}}
    spec = load_sweep(write(tmp_path, search=dists))
    assert list(spec.search) == ["model.loss_weights.loss_featrec", "model.grouper.n_iters"]


@pytest.mark.parametrize(
    ("dist", "expected"),
    [
        ({"choise": [3, 4]}, "unknown distribution 'choise' (did you mean choice?)"),
        ({"choice": [3], "grid": [4]}, "give exactly one distribution"),
        ({"choice": []}, "choice needs a non-empty list"),
        ({"uniform": [1.0, 0.1]}, "uniform needs low < high, got [1.0, 0.1]"),
        ({"uniform": [0.1]}, "uniform needs [low, high] (numbers)"),
        ({"loguniform": [0.0, 0.5]}, "loguniform needs low > 0 (a log scale)"),
        ({"randint": [1.5, 4]}, "randint needs integers [low, high)"),
        ({"quniform": [0.1, 0.5, 0]}, "quniform needs q > 0"),
        ({"qloguniform": [0.1, 0.5]}, "qloguniform needs [low, high, q]"),
    ],
)
def test_bad_distributions(tmp_path, dist, expected):
    message = error(write(tmp_path, search={"model.losses.loss_ss.temperature": dist}))
    assert expected in message and "search model.losses.loss_ss.temperature" in message


def test_every_choice_is_checked_against_the_config(tmp_path):
    message = error(write(tmp_path, search={"globals.NUM_SLOTS": {"choice": [3, 0]}}))
    assert "search globals.NUM_SLOTS: value 0 is invalid: globals.NUM_SLOTS must be >= 1" in message
    message = error(write(tmp_path, search={"trainer.max_steps": {"randint": [0, 4]}}))
    assert "value 0 is invalid: trainer.max_steps must be >= 1" in message
    message = error(write(tmp_path, search={"model.grouper.n_iters": {"choice": [2, "many"]}}))
    assert "value 'many' is invalid" in message


def test_float_range_on_int_key(tmp_path):
    message = error(write(tmp_path, search={"model.grouper.n_iters": {"uniform": [2, 5]}}))
    assert "model.grouper.n_iters is an int: use randint or choice" in message


def test_seed_is_not_searchable(tmp_path):
    assert "set per trial" in error(write(tmp_path, search={"seed": {"choice": [1, 2]}}))


# --------------------------------------------------------------------------- algorithm, trials
def test_grid_with_optuna_is_rejected(tmp_path):
    grid = {"globals.NUM_SLOTS": {"grid": [3, 4]}}
    optuna = {"name": "optuna", "seed": 0}
    message = error(write(tmp_path, search=grid, algorithm=optuna))
    assert "grid search is not supported by optuna: use choice, or algorithm grid" in message


def test_random_sweep_with_grid_dimensions_is_stratified(tmp_path):
    """Every value of a grid dimension is tried equally often; the rest is sampled per trial."""
    dists = {"globals.NUM_SLOTS": {"grid": [1, 3, 5]},
             "model.losses.loss_ss.temperature": {"loguniform": [0.05, 0.5]}}
    spec = load_sweep(write(tmp_path, search=dists, trials=6))
    assert C.strata(spec) == 3 and num_samples(spec) == 2
    space = param_space(spec)
    assert space["globals.NUM_SLOTS"] == {"grid_search": [1, 3, 5]}
    message = error(write(tmp_path, search=dists, trials=4))
    assert "trials=4 but the grid dimensions have 3 points" in message
    assert C.strata(load_sweep(write(tmp_path, trials=4))) == 1  # no grid dimension


def test_grid_algorithm_size_and_trials(tmp_path):
    dists = {"globals.NUM_SLOTS": {"choice": [3, 4, 5]}, "model.grouper.n_iters": {"grid": [1, 2]}}
    grid = {"name": "grid", "seed": 0}
    spec = load_sweep(write(tmp_path, search=dists, algorithm=grid, trials=None))
    assert grid_size(spec) == spec.trials == 6 and num_samples(spec) == 1
    assert load_sweep(write(tmp_path, search=dists, algorithm=grid, trials=6)).trials == 6
    message = error(write(tmp_path, search=dists, algorithm=grid, trials=4))
    assert "trials=4 but the grid has 6 points: set trials: null or 6" in message
    message = error(write(tmp_path, search={**dists, "optimizer.lr": {"uniform": [1e-4, 1e-3]}},
                          algorithm=grid, trials=None))
    assert "algorithm grid needs finite choices" in message


def test_trials_concurrency_failures_and_algorithm_name(tmp_path):
    assert "trials must be >= 1 for algorithm random, got 0" in error(write(tmp_path, trials=0))
    assert "concurrency must be >= 1" in error(write(tmp_path, concurrency=0))
    assert "max_failures must be >= 0" in error(write(tmp_path, max_failures=-1))
    message = error(write(tmp_path, algorithm={"name": "optima"}))
    assert "algorithm.name 'optima' is not one of random, grid, optuna (did you mean optuna?)" in (
        message
    )


# --------------------------------------------------------------------------- resources, cluster
def test_resources(tmp_path):
    message = error(write(tmp_path, resources={"cpus_per_trial": 1, "gpus_per_trial": 1.5}))
    assert "resources.gpus_per_trial=1.5: above 1, GPUs come whole: use 2" in message
    assert "cpus_per_trial must be > 0" in error(write(tmp_path, resources={"cpus_per_trial": 0}))
    message = error(write(tmp_path, resources={"gpus_per_trial": 0.25, "workers": 2}))
    assert "a fractional GPU runs one process" in message
    message = error(write(tmp_path, resources={"gpus_per_trial": 2, "workers": 3}))
    assert "resources.workers=3 does not divide gpus_per_trial=2" in message
    spec = load_sweep(write(tmp_path, resources={"cpus_per_trial": 8, "gpus_per_trial": 2}))
    assert spec.resources.workers == 2
    spec = load_sweep(write(tmp_path, resources={"cpus_per_trial": 2, "gpus_per_trial": 0.25}))
    assert spec.resources.workers == 1


def test_check_cluster():
    spec = load_sweep("quickstart", ["resources.gpus_per_trial=2", "resources.cpus_per_trial=8"])
    with pytest.raises(ConfigError) as info:
        check_cluster(spec, {"CPU": 16.0})
    expected = "resources.gpus_per_trial=2 but the cluster has 0 GPUs: lower it or add GPU nodes"
    assert str(info.value) == expected
    with pytest.raises(ConfigError) as info:
        check_cluster(spec, {"CPU": 4.0, "GPU": 2.0})
    assert str(info.value).startswith("resources.cpus_per_trial=8 but the cluster has 4 CPUs")
    check_cluster(spec, {"CPU": 8.0, "GPU": 2.0})


# --------------------------------------------------------------------------- select, scheduler
def test_select_metric_must_be_logged(tmp_path):
    message = error(write(tmp_path, select={"metric": "val/aris", "mode": "max"}))
    assert "select.metric 'val/aris' is not a metric training logs" in message
    assert "(did you mean val/ari?)" in message
    assert "valid: train/loss, train/loss/featrec, train/loss/ss, val/loss, val/ari, val/mbo" in (
        message
    )
    message = error(write(tmp_path, select={"metric": "val/ari", "tie_break": "val/mob"}))
    assert "select.tie_break 'val/mob'" in message and "valid:" in message
    assert "select.mode must be max or min" in error(write(tmp_path, select={"mode": "maximum"}))


def test_metric_names_follow_the_module():
    from core.training.module import TRAIN_LOSS, VAL_LOSS, train_loss_key, val_metric_key

    assert (C.TRAIN_LOSS, C.VAL_LOSS) == (TRAIN_LOSS, VAL_LOSS)
    cfg = load_config("tiny", ["model.loss_weights.loss_ss=0"])
    assert C.metric_names(cfg) == [TRAIN_LOSS, train_loss_key("loss_featrec"), VAL_LOSS,
                                   val_metric_key("ari"), val_metric_key("mbo")]


def test_asha_checks(tmp_path):
    base = {"name": "asha", "grace_period": 4, "reduction_factor": 2}
    assert load_sweep(write(tmp_path, scheduler=base)).scheduler.grace_period == 4
    message = error(write(tmp_path, scheduler={**base, "reduction_factor": 1}))
    assert "scheduler.reduction_factor must be >= 2" in message
    message = error(write(tmp_path, scheduler={**base, "grace_period": 2}))
    assert "scheduler.grace_period=2 < trainer.val_check_interval=4" in message
    message = error(write(tmp_path, scheduler={**base, "grace_period": 8}))
    assert "ASHA would never stop a trial" in message
    assert "did you mean asha" in error(write(tmp_path, scheduler={"name": "ashe"}))


def test_make_scheduler():
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    assert isinstance(make_scheduler(load_sweep("quickstart"), 4), FIFOScheduler)
    spec = load_sweep("saycam_slots", ["search.trainer.max_steps={choice: [10000, 30000]}"])
    asha = make_scheduler(spec, 2500)
    assert isinstance(asha, ASHAScheduler)
    assert (asha._time_attr, asha._metric, asha._mode, asha._max_t) == ("step", "val/ari", "max",
                                                                        30000)
    assert asha._reduction_factor == 3
    assert [rung for rung, _ in asha._brackets[0]._rungs] == [22500, 7500, 2500]  # grace 2500
    with pytest.raises(ConfigError) as info:
        make_scheduler(spec, 5000)
    assert "grace_period=2500 < trainer.val_check_interval=5000" in str(info.value)


# --------------------------------------------------------------------------- storage, paths, mlflow
def test_paths_are_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = load_sweep(SWEEPS / "quickstart.yaml", ["storage=out", "data_dir=data"])
    assert spec.storage == str(tmp_path / "out") and spec.data_dir == str(tmp_path / "data")
    assert load_sweep(SWEEPS / "quickstart.yaml").storage == str(tmp_path / "runs" / "sweeps")
    assert load_sweep("quickstart", ["storage=s3://bucket/sweeps"]).storage == "s3://bucket/sweeps"
    spec = load_sweep("quickstart", ["mlflow.tracking_uri=sqlite:///mlflow.db"])
    assert spec.mlflow.tracking_uri == f"sqlite:///{tmp_path}/mlflow.db"
    message = error(write(tmp_path, mlflow={"experiment": " "}))
    assert "mlflow.experiment must not be empty" in message


# --------------------------------------------------------------------------- command line
def test_command_line_overrides_sweep_fields_and_config_keys():
    spec = load_sweep("quickstart", [
        "trials=8", "concurrency=1", "resources.gpus_per_trial=0.5", "algorithm.seed=3",
        "select.metric=val/mbo", "name=x", "trainer.max_steps=4", "grouper.n_iters=5",
        "search.optimizer.lr={loguniform: [1e-4, 1e-3]}", "select.tie_break=null", "seed=7",
    ])
    assert (spec.trials, spec.concurrency, spec.resources.gpus_per_trial) == (8, 1, 0.5)
    assert (spec.algorithm.seed, spec.select.metric, spec.name, spec.seed) == (3, "val/mbo", "x", 7)
    assert spec.select.tie_break is None
    assert spec.overrides[-2:] == ["trainer.max_steps=4", "grouper.n_iters=5"]
    assert spec.search["optimizer.lr"].args == [1e-4, 1e-3]
    assert load_config(spec.base, spec.overrides).trainer.max_steps == 4


def test_command_line_errors():
    quick = SWEEPS / "quickstart.yaml"
    assert "names neither a sweep field nor a config key (did you mean trials?)" in error(
        quick, "trails=8"
    )
    assert "is not key=value" in error(quick, "trials")
    assert "sweep field concurrency must be an int" in error(quick, "concurrency=two")
    assert "unknown config key 'trainer.max_step'" in error(quick, "trainer.max_step=3")


# --------------------------------------------------------------------------- Ray Tune pieces
def test_param_space_domains():
    from ray import tune
    from ray.tune.search.sample import Categorical, Float, Integer, Quantized

    spec = load_sweep("quickstart", [
        "search.trainer.max_steps={randint: [4, 9]}",
        "search.optimizer.lr={quniform: [1e-4, 1e-3, 1e-4]}",
    ])
    space = param_space(spec)
    assert isinstance(space["globals.NUM_SLOTS"], Categorical)
    assert space["globals.NUM_SLOTS"].categories == [3, 4]
    temp = space["model.losses.loss_ss.temperature"]
    assert isinstance(temp, Float) and (temp.lower, temp.upper) == (0.05, 0.5)
    assert isinstance(temp.get_sampler(), Float._LogUniform)
    assert isinstance(space["trainer.max_steps"], Integer)
    assert (space["trainer.max_steps"].lower, space["trainer.max_steps"].upper) == (4, 9)
    lr = space["optimizer.lr"]
    assert isinstance(lr.get_sampler(), Quantized) and lr.get_sampler().q == 1e-4
    assert isinstance(space["model.loss_weights.loss_ss"].get_sampler(), Float._Uniform)
    grid = load_sweep("quickstart", [
        "algorithm.name=grid", "search={globals.NUM_SLOTS: {choice: [3, 4]}}", "trials=null",
    ])
    assert param_space(grid) == {"globals.NUM_SLOTS": tune.grid_search([3, 4])}


def test_trial_overrides_round_trip():
    spec = load_sweep("quickstart", [
        "search.optimizer.betas={choice: [[0.9, 0.99], [0.8, 0.999]]}",
        "search.trainer.max_steps={randint: [4, 9]}",
        "search.trainer.deterministic={choice: [true, false]}",
        "search.trainer.precision={choice: ['32', bf16]}",
    ])
    space = param_space(spec)
    for _ in range(5):
        sampled = {key: domain.sample() for key, domain in space.items()}
        items = trial_overrides(spec, sampled)
        assert [i.split("=")[0] for i in items] == sorted(sampled)
        flat = flatten(load_config(spec.base, [*spec.overrides, *items]))
        for key, value in sampled.items():
            assert flat[key] == value and type(flat[key]) is type(value), (key, value, flat[key])
    assert trial_overrides(spec, {"trainer.deterministic": True, "trainer.precision": "32",
                                  "optimizer.lr": 7.34e-05}) == [
        "optimizer.lr=7.34e-05", "trainer.deterministic=true", 'trainer.precision="32"']


def test_trial_resources():
    spec = load_sweep("quickstart", ["resources.cpus_per_trial=2", "resources.gpus_per_trial=0.5"])
    assert trial_resources(spec) == {"cpu": 2.0, "gpu": 0.5}
    ddp = load_sweep("quickstart", ["resources.cpus_per_trial=8", "resources.gpus_per_trial=2"])
    assert ddp.resources.workers == 2 and trial_resources(ddp) == {"cpu": 0.01}  # workers hold it


def test_tune_config():
    from ray.tune.schedulers import FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    config = tune_config(load_sweep("quickstart"), 4, reuse_actors=True)
    assert isinstance(config.search_alg, BasicVariantGenerator)
    assert isinstance(config.scheduler, FIFOScheduler)
    assert (config.num_samples, config.reuse_actors) == (4, True)


def test_search_algorithms_and_seeded_optuna():
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    random = make_search_alg(load_sweep("quickstart"))
    assert isinstance(random, BasicVariantGenerator) and random.max_concurrent == 2
    grid = make_search_alg(load_sweep("quickstart", ["algorithm.name=grid", "trials=null",
                                                     "search={globals.NUM_SLOTS: {grid: [3, 4]}}"]))
    assert isinstance(grid, BasicVariantGenerator)
    spec = load_sweep("saycam_slots")
    suggestions = []
    for _ in range(2):  # same seed, same first configs; no Ray cluster needed
        limiter = make_search_alg(spec)
        assert isinstance(limiter, ConcurrencyLimiter) and limiter.max_concurrent == 4
        assert isinstance(limiter.searcher, OptunaSearch)
        assert limiter.set_search_properties(None, None, param_space(spec))
        suggestions.append([limiter.suggest(f"t{i}") for i in range(3)])
    assert suggestions[0] == suggestions[1]
    assert set(suggestions[0][0]) == set(spec.search)
    other = make_search_alg(load_sweep("saycam_slots", ["algorithm.seed=1"]))
    other.set_search_properties(None, None, param_space(spec))
    assert other.suggest("t0") != suggestions[0][0]


def test_seeded_random_search_is_reproducible(tmp_path):
    """BasicVariantGenerator(random_state=seed) hands out the same configs; no Ray cluster."""
    from ray.tune.experiment import Experiment

    def configs(seed: int) -> list[dict]:
        spec = load_sweep("quickstart", [f"algorithm.seed={seed}", "concurrency=4"])
        alg = make_search_alg(spec)
        alg.add_configurations([Experiment("t", lambda config: None, config=param_space(spec),
                                           num_samples=num_samples(spec),
                                           storage_path=str(tmp_path))])
        out = []
        while (trial := alg.next_trial()) is not None:
            out.append(trial.config)
        return out

    first = configs(0)
    assert len(first) == 4 and first == configs(0) and first != configs(1)


def test_the_live_tables_headline_counts_planned_trials_best_elapsed_and_eta():
    from types import SimpleNamespace

    from core.text import duration
    from orchestrator.progress import DONE, RUNNING, ProgressTable

    table = ProgressTable(["val/ari", "val/mbo"], ["globals.NUM_SLOTS"], planned=4,
                          max_steps=100, mode="max")
    table.setup()
    start = table._start
    trial = SimpleNamespace(trial_id="t0", config={})
    for step, ari in ((50, 0.3), (100, 0.1)):  # t0 peaked at step 50
        table.on_trial_result(0, [], trial, {"step": step, "val/ari": ari, "val/mbo": 0.1})
    table.rows["t0"]["state"] = DONE
    table.rows["t1"] = {"state": RUNNING, "step": 50, "val/ari": 0.3, "val/mbo": 0.2}
    line = table.headline(now=start + 60)
    assert line.startswith("1 finished, 1 running, 2 pending of 4 planned")
    assert "best so far t1 val/ari=0.3 (step 50)" in line  # ties t0's best, wins on val/mbo
    table.rows["t1"]["val/mbo"] = 0.05
    assert "best so far t0 val/ari=0.3 (step 50)" in table.headline(now=start + 60)  # t0's best
    assert "elapsed 1m00s" in line
    assert "ETA ~1m40s" in line  # 150 of 400 steps in 60 s: 250 more take 100 s
    assert duration(42) == "42s" and duration(3725) == "1h02m"

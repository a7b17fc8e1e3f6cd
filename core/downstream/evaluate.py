"""``slotsweep evaluate``: what the slots of a trained model are good for, next to two baselines
on exactly the same clips and split.

Representations (rows of every table):

- ``slots``: the trained model's slots, averaged over the clip's frames, then the mean and the
  max over slots side by side (2D numbers; the same whatever the slots' order);
- ``untrained``: the same pooling of an untrained slot model of the same architecture (seeded
  fresh weights) on the same frozen backbone features: what training the slots added;
- ``backbone``: the frozen backbone's patch features averaged over frames and patches.

Tasks:

- ``linear_probe``: multinomial logistic regression (scikit-learn) from a clip's representation
  to its label. A quarter of the videos are held out for the test (never frames of one video on
  both sides); on the rest the features are standardised and the inverse regularisation C
  (1e-3 .. 10) is chosen by 3-fold cross-validation grouped by video. Accuracy and macro-F1
  (the unweighted mean of the classes' F1, so a majority class cannot hide the others).
  Object level: every ground-truth object's matched slot (features file: largest mask overlap),
  or the backbone averaged over its patches, -> its shape, colour and size tercile (small /
  medium / large), same protocol.
- ``4way_classification``: each episode a query clip and four candidates in random order, one of
  the query's category from another video and three of three other categories; the pick is the
  candidate of highest cosine similarity (vectors centred on the mean of all clips). Accuracy over
  the episodes with its 95% Wilson interval; chance is 0.25.
- ``few_shot``: N-way k-shot nearest prototype (N = min(5, categories)): k support videos and one
  query video per category, the prototype the mean of the normalised support vectors, cosine
  similarity. Mean episode accuracy with a 95% interval (1.96 standard errors); chance is 1/N.

Episodes and splits are drawn from ``numpy.random.default_rng(seed)``: the same seed gives the
same numbers.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from core.downstream import CLIP_LABELS, OBJECT_ATTRIBUTES, TASKS
from core.errors import ConfigError, DataError

C_GRID = tuple(float(c) for c in np.logspace(-3, 1, 5))


def _numpy(x: Any) -> np.ndarray:
    return x.detach().float().numpy() if hasattr(x, "detach") else np.asarray(x, np.float32)


def _pool(slots: Any) -> np.ndarray:
    per_clip = _numpy(slots).mean(axis=1)  # (N, K, D): the clip's slots, mean over frames
    return np.concatenate([per_clip.mean(axis=1), per_clip.max(axis=1)], axis=1)


def clip_vectors(features: dict[str, Any]) -> dict[str, np.ndarray]:
    """Each representation's vector of every clip (see the module docstring)."""
    return {"slots": _pool(features["slots"]), "untrained": _pool(features["untrained_slots"]),
            "backbone": _numpy(features["backbone"])}


def object_vectors(features: dict[str, Any]) -> dict[str, np.ndarray]:
    """Each representation's vector of every matched ground-truth object."""
    clips = np.array([row["clip"] for row in features["object_rows"]], dtype=np.int64)
    out = {"backbone": _numpy(features["object_backbone"])}
    for name, slots_key, match_key in (("slots", "slots", "object_slot"),
                                       ("untrained", "untrained_slots", "object_untrained_slot")):
        per_clip = _numpy(features[slots_key]).mean(axis=1)  # (N, K, D)
        out[name] = per_clip[clips, _numpy(features[match_key]).astype(np.int64)]
    return out


def clip_labels(features: dict[str, Any], key: str) -> np.ndarray:
    """The clips' labels by ``key`` as strings ("" where a clip has none)."""
    if key not in CLIP_LABELS:
        raise ConfigError(f"unknown --label {key!r}: known: {', '.join(CLIP_LABELS)}")
    values = features["labels"] if key == "label" else features["n_objects"]
    labels = np.array(["" if v is None else str(v) for v in values], dtype=object)
    if not (labels != "").any():
        raise DataError("the clips have no 'label': give each video of the index a \"label\" "
                        "(core/data/layout.py), lay images out as ROOT/<category>/*.jpg, or "
                        "choose --label n_objects")
    return labels


def size_terciles(sizes: list[Any]) -> np.ndarray:
    """``small`` / ``medium`` / ``large`` by the terciles of the objects' sizes."""
    values = np.array([np.nan if s is None else float(s) for s in sizes])
    low, high = np.nanquantile(values, [1 / 3, 2 / 3]) if np.isfinite(values).any() else (0, 0)
    names = np.where(values <= low, "small", np.where(values <= high, "medium", "large"))
    return np.where(np.isnan(values), "", names).astype(object)


def _check_classes(labels: np.ndarray, what: str) -> None:
    classes = sorted(set(labels) - {""})
    if len(classes) < 2:
        raise DataError(f"{what} has one class only ({classes[0] if classes else 'none'}): a "
                        "task needs at least two categories")


def split_by_video(labels: np.ndarray, groups: np.ndarray, seed: int) -> tuple[np.ndarray, ...]:
    """(train, test) indices: about a quarter of the videos held out, classes spread evenly."""
    from sklearn.model_selection import StratifiedGroupKFold

    if len(set(groups)) < 4:
        raise DataError(f"a split by video needs at least 4 videos; these clips come from "
                        f"{len(set(groups))}: extract more (e.g. --split train as well)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "least populated class" is expected
        folds = StratifiedGroupKFold(n_splits=4, shuffle=True, random_state=seed)
        train, test = next(folds.split(np.zeros(len(labels)), labels, groups))
    return train, test


def probe(x: np.ndarray, labels: np.ndarray, groups: np.ndarray, train: np.ndarray,
          test: np.ndarray) -> dict[str, float]:
    """Logistic regression on ``train`` (C by grouped 3-fold CV), scored on ``test``."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.model_selection import GroupKFold
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x[train])
    x_train, x_test = scaler.transform(x[train]), scaler.transform(x[test])
    folds = list(GroupKFold(min(3, len(set(groups[train])))).split(x_train, groups=groups[train]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", UserWarning)  # a fold without one of the classes
        warnings.simplefilter("ignore", FutureWarning)  # sklearn 1.9's notes on 1.10's defaults
        # the regularisation path is warm-started from C to C (far quicker than a grid search)
        model = LogisticRegressionCV(Cs=C_GRID, cv=folds, scoring="accuracy", max_iter=100,
                                     tol=1e-3).fit(x_train, labels[train])
        predicted = model.predict(x_test)
    present = sorted(set(labels[test]))
    _, counts = np.unique(labels[test], return_counts=True)
    return {"accuracy": float(accuracy_score(labels[test], predicted)),
            "macro_f1": float(f1_score(labels[test], predicted, labels=present, average="macro",
                                       zero_division=0)),
            "C": float(np.ravel(model.C_)[0]), "chance": float(counts.max() / counts.sum())}


def _probe_level(vectors: dict[str, np.ndarray], labels: np.ndarray, groups: np.ndarray,
                 seed: int, what: str) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    keep = np.flatnonzero(labels != "")
    labels, groups = labels[keep], groups[keep]
    _check_classes(labels, what)
    train, test = split_by_video(labels, groups, seed)
    scores = {name: probe(vec[keep], labels, groups, train, test) for name, vec in vectors.items()}
    info = {"classes": len(set(labels)), "train": len(train), "test": len(test),
            "train_videos": len(set(groups[train])), "test_videos": len(set(groups[test])),
            "unlabelled": int(len(keep) != len(vectors["slots"]))}
    return scores, info


def linear_probe(features: dict[str, Any], label: str = "label", seed: int = 0) -> dict[str, Any]:
    """Clip-level and object-level probes (see the module docstring)."""
    groups = np.array(features["video_ids"], dtype=object)
    levels = []
    scores, info = _probe_level(clip_vectors(features), clip_labels(features, label), groups,
                                seed, f"clip label {label!r}")
    levels.append((f"clip {label}", "", scores, info))
    rows = features["object_rows"]
    if rows:
        vectors = object_vectors(features)
        object_groups = groups[[row["clip"] for row in rows]]
        for attribute in OBJECT_ATTRIBUTES:
            values = [row.get(attribute) for row in rows]
            labels = (size_terciles(values) if attribute == "size" else
                      np.array(["" if v is None else str(v) for v in values], dtype=object))
            if len(set(labels) - {""}) < 2:
                continue  # e.g. every object the same colour: nothing to predict
            scores, info = _probe_level(vectors, labels, object_groups, seed,
                                        f"object {attribute}")
            levels.append((f"object {attribute}", f"object_{attribute}_", scores, info))
    metrics = {}
    for _, prefix, scores, _ in levels:
        for rep, score in scores.items():
            base = "" if rep == "slots" else f"{rep}/"
            metrics[f"{base}{prefix}accuracy"] = score["accuracy"]
            metrics[f"{base}{prefix}macro_f1"] = score["macro_f1"]
    return {"task": "linear_probe", "label": label, "seed": seed, "metrics": metrics,
            "levels": [{"level": name, "scores": scores, **info}
                       for name, _, scores, info in levels]}


def wilson(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion ``correct / n``."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _unit(x: np.ndarray) -> np.ndarray:
    x = x - x.mean(axis=0, keepdims=True)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _by_class_and_video(labels: np.ndarray, groups: np.ndarray) -> dict[str, dict[str, list]]:
    table: dict[str, dict[str, list]] = {}
    for i, (label, group) in enumerate(zip(labels, groups, strict=True)):
        if label != "":
            table.setdefault(label, {}).setdefault(group, []).append(i)
    return table


def four_way_episodes(labels: np.ndarray, groups: np.ndarray, episodes: int,
                      seed: int) -> np.ndarray:
    """(episodes, 6): query, then four candidates in random order, then the correct position."""
    table = _by_class_and_video(labels, groups)
    if len(table) < 4:
        raise DataError(f"4way_classification needs at least 4 categories; the clips have "
                        f"{len(table)} ({', '.join(sorted(table))})")
    queries = [c for c, videos in table.items() if len(videos) >= 2]
    if not queries:
        raise DataError("4way_classification needs a category with clips of 2 videos or more")
    rng = np.random.default_rng(seed)
    out = np.empty((episodes, 6), dtype=np.int64)
    names = sorted(table)
    for e in range(episodes):
        c = queries[rng.integers(len(queries))]
        videos = sorted(table[c])
        q_video, p_video = rng.choice(len(videos), 2, replace=False)
        pick = [_one(rng, table[c][videos[q_video]]), _one(rng, table[c][videos[p_video]])]
        others = [n for n in names if n != c]
        for n in rng.choice(others, 3, replace=False):
            video = sorted(table[n])[rng.integers(len(table[n]))]
            pick.append(_one(rng, table[n][video]))
        order = rng.permutation(4)
        candidates = [pick[1 + i] for i in order]
        out[e] = [pick[0], *candidates, int(np.flatnonzero(order == 0)[0])]
    return out


def _one(rng: np.random.Generator, items: list) -> int:
    return int(items[rng.integers(len(items))])


def four_way(features: dict[str, Any], label: str = "label", seed: int = 0,
             episodes: int = 1000) -> dict[str, Any]:
    labels = clip_labels(features, label)
    table = four_way_episodes(labels, np.array(features["video_ids"], dtype=object), episodes,
                              seed)
    scores, metrics = {}, {}
    for name, vectors in clip_vectors(features).items():
        unit = _unit(vectors)
        similarity = np.einsum("ed,ecd->ec", unit[table[:, 0]], unit[table[:, 1:5]])
        correct = int((similarity.argmax(axis=1) == table[:, 5]).sum())
        low, high = wilson(correct, episodes)
        scores[name] = {"accuracy": correct / episodes, "low": low, "high": high}
        base = "" if name == "slots" else f"{name}/"
        metrics.update({f"{base}accuracy": correct / episodes, f"{base}accuracy_low": low,
                        f"{base}accuracy_high": high})
    return {"task": "4way_classification", "label": label, "seed": seed, "metrics": metrics,
            "episodes": episodes, "chance": 0.25, "classes": len(set(labels) - {""}),
            "scores": scores}


def few_shot_episodes(labels: np.ndarray, groups: np.ndarray, shots: int, episodes: int,
                      seed: int, ways: int = 5) -> tuple[np.ndarray, np.ndarray, int]:
    """(support (E, N, k), query (E, N), N): clip indices; class j of an episode is row j."""
    table = _by_class_and_video(labels, groups)
    able = sorted(c for c, videos in table.items() if len(videos) >= shots + 1)
    if len(able) < 2:
        raise DataError(f"few_shot with {shots} shot(s) needs at least 2 categories with "
                        f"{shots + 1} videos each ({shots} support + 1 query); the clips have "
                        f"{len(able)}: label more videos or use --shots 1")
    n = min(ways, len(able))
    rng = np.random.default_rng(seed)
    support = np.empty((episodes, n, shots), dtype=np.int64)
    query = np.empty((episodes, n), dtype=np.int64)
    for e in range(episodes):
        for j, c in enumerate(rng.choice(able, n, replace=False)):
            videos = sorted(table[c])
            chosen = rng.choice(len(videos), shots + 1, replace=False)
            support[e, j] = [_one(rng, table[c][videos[v]]) for v in chosen[:shots]]
            query[e, j] = _one(rng, table[c][videos[chosen[shots]]])
    return support, query, n


def few_shot(features: dict[str, Any], label: str = "label", seed: int = 0,
             episodes: int = 1000, shots: tuple[int, ...] = (1, 5)) -> dict[str, Any]:
    labels = clip_labels(features, label)
    groups = np.array(features["video_ids"], dtype=object)
    drawn = {k: few_shot_episodes(labels, groups, k, episodes, seed) for k in shots}
    scores: dict[str, dict[str, Any]] = {}
    metrics = {}
    for name, vectors in clip_vectors(features).items():
        unit = _unit(vectors)
        scores[name] = {}
        for k, (support, query, n) in drawn.items():
            prototypes = unit[support].mean(axis=2)  # (E, N, D)
            similarity = np.einsum("eqd,epd->eqp", unit[query], prototypes)
            per_episode = (similarity.argmax(axis=2) == np.arange(n)).mean(axis=1)
            mean = float(per_episode.mean())
            half = float(1.96 * per_episode.std(ddof=1) / math.sqrt(episodes)) if episodes > 1 \
                else 0.0
            scores[name][k] = {"accuracy": mean, "ci95": half, "ways": n}
            base = "" if name == "slots" else f"{name}/"
            metrics[f"{base}{k}shot_accuracy"] = mean
            metrics[f"{base}{k}shot_ci95"] = half
    return {"task": "few_shot", "label": label, "seed": seed, "metrics": metrics,
            "episodes": episodes, "shots": list(shots), "classes": len(set(labels) - {""}),
            "scores": scores}


def evaluate(features: dict[str, Any], task: str, label: str = "label", seed: int = 0,
             episodes: int = 1000, shots: tuple[int, ...] = (1, 5)) -> dict[str, Any]:
    """Run ``task`` on loaded features (:func:`core.downstream.features.load_features`)."""
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}: known: {', '.join(TASKS)}")
    if episodes < 1 or any(k < 1 for k in shots):
        raise ConfigError("--episodes and --shots must be positive")
    from threadpoolctl import threadpool_limits

    # one BLAS thread: these matrices are small, and BLAS's threads beside torch's (imported by
    # extraction) made the probe 10x slower on 2 cores (12.5 s -> 0.9 s for one probe)
    with threadpool_limits(limits=1):
        if task == "linear_probe":
            return linear_probe(features, label, seed)
        if task == "4way_classification":
            return four_way(features, label, seed, episodes)
        return few_shot(features, label, seed, episodes, shots)

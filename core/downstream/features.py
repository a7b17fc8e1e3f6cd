"""What downstream tasks read: the slots of every clip, two baselines' representations of the
same clips, labels, and each ground-truth object matched to a slot.

``slotsweep extract-features --checkpoint CKPT [--data-dir D | --images ROOT]`` writes one file
per split, ``<output_dir>/<split>.pt`` (format ``slotsweep.features/v2``)::

    slots                 (N, T, K, D) float32  the trained model's slots of each clip
    untrained_slots       (N, T, K, D)          the same architecture freshly initialised (seeded),
                                                on the same frozen backbone features
    backbone              (N, F)                the frozen backbone's features, mean over frames
                                                and patches
    video_ids, starts     N                     which clip (video id, first frame)
    labels                N                     each clip's video's ``label`` (None if unlabelled)
    n_objects             N                     objects listed for the clip's video
    object_rows           M dicts               each ground-truth object visible in a clip: clip,
                                                id, shape, color, size (from the index)
    object_slot           (M,) int64            the trained slot whose mask overlaps it most
    object_untrained_slot (M,) int64            the same for the untrained model
    object_backbone       (M, F)                backbone features averaged over its patches
    model                 dict                  backbone name, weights, K, D: what made the file

Object matching is the slot property-prediction protocol (e.g. Dittadi et al., "Generalization
and Robustness Implications in Object-Centric Learning", ICML 2022): a slot's soft mask and the
object's mask, both on the patch grid, overlap by the sum over frames and patches of their
product; the object takes the slot of largest overlap. Objects never visible in a clip are left
out.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from core.errors import ConfigError, DataError

FORMAT = "slotsweep.features/v2"
IMAGES_SPLIT = "images"
UNTRAINED_SEED = 0


def _loader(cfg: Any, data_dir: str | Path | None, images: str | Path | None, split: str,
            batch_size: int | None) -> tuple[list, Any]:
    """(records, loader of fixed clips) of a split of the checkpoint's dataset, or of a labelled
    image set read as single-frame clips."""
    from core.data.clips import ClipDataset
    from core.data.records import scan_labelled_images
    from core.models.encoder import normalization_of
    from core.tools import split_clips

    if images is None:
        records, loader, _ = split_clips(cfg, data_dir, split, batch_size)
        return records, loader
    mean, std = normalization_of(cfg.model.encoder.backbone)
    records = scan_labelled_images(images)
    clips = ClipDataset(records, 1, cfg.dataset.img_size, mean, std, train=False,
                        val_clips="first", resize=cfg.dataset.resize)
    return records, torch.utils.data.DataLoader(clips, batch_size=batch_size or 16)


def _untrained(cfg: Any) -> Any:
    """The checkpoint's architecture with fresh weights (seeded), for the baseline."""
    from core.training.module import SlotModule

    with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
        torch.manual_seed(UNTRAINED_SEED)
        return SlotModule(cfg).eval()


def match_objects(slot_masks: torch.Tensor, true: torch.Tensor) -> tuple[list, list, torch.Tensor]:
    """Each visible object of each clip and its slot of largest overlap.

    ``slot_masks`` (B, T, K, h, w) soft masks; ``true`` (B, T, H, W) instance ids (0 is the
    background). Returns (clip index, object id) pairs, their slot indices, and each object's
    patch weights (M, T, h, w) (its share of each patch, for pooling patch features).
    """
    B, T, _, h, w = slot_masks.shape
    pairs, slots, weights = [], [], []
    for b in range(B):
        ids = [int(i) for i in true[b].unique() if int(i) != 0]
        if not ids:
            continue
        one_hot = torch.stack([(true[b] == i).float() for i in ids], dim=1)  # (T, O, H, W)
        pooled = F.adaptive_avg_pool2d(one_hot, (h, w))  # (T, O, h, w)
        overlap = torch.einsum("tkhw,tohw->ok", slot_masks[b].float(), pooled)
        for o, obj in enumerate(ids):
            pairs.append((b, obj))
            slots.append(int(overlap[o].argmax()))
            weights.append(pooled[:, o])
    stacked = torch.stack(weights) if weights else torch.zeros(0, T, h, w)
    return pairs, slots, stacked


def _attributes(record: Any, obj_id: int) -> dict[str, Any]:
    found = next((o for o in record.objects if o.get("id") == obj_id), {})
    color = found.get("color")
    return {"shape": found.get("shape"), "size": found.get("size"),
            "color": "#{:02x}{:02x}{:02x}".format(*color) if isinstance(color, list) else color}


def extract(checkpoint: str | Path, data_dir: str | Path | None = None, split: str = "val",
            batch_size: int | None = None, images: str | Path | None = None) -> dict[str, Any]:
    """The features of one split (or of a labelled image set), as written by :func:`save`."""
    from core.config import config_to_yaml
    from core.text import Progress
    from core.tools import load_trained

    cfg, module = load_trained(checkpoint)
    untrained = _untrained(cfg)
    records, loader = _loader(cfg, data_dir, images, split, batch_size)
    name = IMAGES_SPLIT if images is not None else split
    out: dict[str, list] = {k: [] for k in ("slots", "untrained_slots", "backbone", "video_ids",
                                            "starts", "object_rows", "object_slot",
                                            "object_untrained_slot", "object_backbone")}
    with torch.no_grad(), Progress(f"extracting slots ({name})", len(loader.dataset),
                                   "clips") as bar:
        for batch in loader:
            first = len(out["video_ids"])
            trained = module.model({"video": batch["video"]})
            features = trained["features"].float()  # (B, T, P, F) frozen backbone
            fresh = untrained.model({"features": features})
            out["slots"].append(trained["slots"].float())
            out["untrained_slots"].append(fresh["slots"].float())
            out["backbone"].append(features.mean(dim=(1, 2)))
            records_of = [records[i] for i in batch["video_index"].tolist()]
            out["video_ids"] += [r.id for r in records_of]
            out["starts"] += batch["start"].tolist()
            if "masks" in batch:
                _add_objects(out, module, trained, fresh, features, batch["masks"], records_of,
                             first)
            bar.update(len(batch["start"]))
    by_id = {r.id: r for r in records}
    backbone = cfg.model.encoder.backbone
    slots, pooled = torch.cat(out["slots"]), torch.cat(out["backbone"])
    return {
        "format": FORMAT, "split": name,
        "slots": slots, "untrained_slots": torch.cat(out["untrained_slots"]),
        "backbone": pooled,
        "video_ids": out["video_ids"], "starts": out["starts"],
        "labels": [by_id[v].label for v in out["video_ids"]],
        "n_objects": [len(by_id[v].objects) for v in out["video_ids"]],
        "object_rows": out["object_rows"],
        "object_slot": torch.tensor(out["object_slot"], dtype=torch.long),
        "object_untrained_slot": torch.tensor(out["object_untrained_slot"], dtype=torch.long),
        "object_backbone": (torch.stack(out["object_backbone"]) if out["object_backbone"]
                            else torch.zeros(0, pooled.shape[-1])),
        "model": {"backbone": backbone.model, "weights": str(backbone.weights),
                  "num_slots": int(slots.shape[2]), "slot_dim": int(slots.shape[3])},
        "checkpoint": str(checkpoint), "config": config_to_yaml(cfg),
    }


def _add_objects(out: dict, module: Any, trained: dict, fresh: dict, features: torch.Tensor,
                 true: torch.Tensor, records_of: list, first: int) -> None:
    pairs, slots, weights = match_objects(module._masks(trained), true)
    _, fresh_slots, _ = match_objects(module._masks(fresh), true)
    for (b, obj), slot, fresh_slot, weight in zip(pairs, slots, fresh_slots, weights,
                                                       strict=True):
        share = weight.flatten()  # (T * h * w,) its share of each patch
        pooled = (features[b].flatten(0, 1) * share[:, None]).sum(0) / share.sum()
        out["object_rows"].append({"clip": first + b, "id": obj,
                                   **_attributes(records_of[b], obj)})
        out["object_slot"].append(slot)
        out["object_untrained_slot"].append(fresh_slot)
        out["object_backbone"].append(pooled)


def save(features: dict[str, Any], output_dir: str | Path) -> Path:
    """Write ``<output_dir>/<split>.pt`` and a readable ``<split>.json`` summary beside it."""
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    path = output / f"{features['split']}.pt"
    torch.save(features, path)
    labels = sorted({str(x) for x in features["labels"] if x is not None})
    (output / f"{features['split']}.json").write_text(json.dumps(
        {"format": FORMAT, "split": features["split"], "clips": len(features["video_ids"]),
         "videos": len(set(features["video_ids"])), "slots_shape": list(features["slots"].shape),
         "objects": len(features["object_rows"]), "labels": labels,
         "checkpoint": features["checkpoint"], "model": features["model"]}, indent=1))
    return path


def extract_features(checkpoint: str | Path, output_dir: str | Path,
                     data_dir: str | Path | None = None, split: str = "val",
                     batch_size: int | None = None, images: str | Path | None = None) -> Path:
    """``slotsweep extract-features``: :func:`extract` then :func:`save`; returns the file."""
    return save(extract(checkpoint, data_dir, split, batch_size, images), output_dir)


CONCAT = ("slots", "untrained_slots", "backbone", "object_backbone")
LISTS = ("video_ids", "starts", "labels", "n_objects")


def load_features(path: str | Path) -> dict[str, Any]:
    """Every features file of a folder (``train.pt``, ``val.pt``, ``images.pt``), or one file,
    joined into one set of clips; refuses files of another format or of different models."""
    path = Path(path)
    files = sorted(path.glob("*.pt")) if path.is_dir() else [path]
    if not path.exists() or not files:
        raise DataError(f"no features at {path}: write them with slotsweep extract-features "
                        "--checkpoint CKPT --output-dir DIR (or pass --checkpoint here)")
    parts = []
    for file in files:
        try:
            data = torch.load(file, map_location="cpu", weights_only=False)
        except Exception as exc:
            raise DataError(f"features file {file} cannot be read ({type(exc).__name__}): "
                            "extract it again") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise DataError(f"{file} is not a {FORMAT} features file (an older or foreign "
                            "file): extract it again with slotsweep extract-features")
        parts.append((file, data))
    first_file, first = parts[0]
    for file, data in parts[1:]:
        if data["model"] != first["model"] or data["checkpoint"] != first["checkpoint"]:
            raise ConfigError(f"{file} and {first_file} come from different models "
                              f"({data['checkpoint']} vs {first['checkpoint']}): keep one "
                              "model's features per folder")
    return _join([data for _, data in parts], [file.name for file, _ in parts])


def _join(parts: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    if len(parts) == 1:
        return {**parts[0], "files": names}
    joined: dict[str, Any] = {k: torch.cat([p[k] for p in parts]) for k in CONCAT}
    for key in LISTS:
        joined[key] = [x for p in parts for x in p[key]]
    offset, rows, slot, fresh = 0, [], [], []
    for p in parts:
        rows += [{**row, "clip": row["clip"] + offset} for row in p["object_rows"]]
        slot.append(p["object_slot"])
        fresh.append(p["object_untrained_slot"])
        offset += len(p["video_ids"])
    seen: dict[str, str] = {}
    for p in parts:  # one video in two files would put its frames on both sides of a split
        for vid in set(p["video_ids"]):
            if vid in seen and seen[vid] != p["split"]:
                raise DataError(f"video {vid} is in both {seen[vid]} and {p['split']} features: "
                                "extract each split once")
            seen[vid] = p["split"]
    return {**parts[0], **joined, "object_rows": rows, "object_slot": torch.cat(slot),
            "object_untrained_slot": torch.cat(fresh), "split": "+".join(p["split"] for p in parts),
            "files": names}

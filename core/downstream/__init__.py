"""After training: what the slots are good for (the seed's downstream evaluation and
fine-tuning), per checkpoint, with ``core`` alone."""

# Names the command line needs before anything heavy is imported (``slotsweep --help``).
TASKS = ("linear_probe", "4way_classification", "few_shot")
REPRESENTATIONS = {"slots": "slots (trained)", "untrained": "untrained slot model",
                   "backbone": "backbone mean-pooled"}
CLIP_LABELS = ("label", "n_objects")
OBJECT_ATTRIBUTES = ("shape", "color", "size")

"""A fresh interpreter for the streaming memory test (tests/data/test_streaming.py): what
`builders.build_data` does with a data=folder source (the bundle, the stain fitted on train, the
training loader), one epoch of that loader, and the error galleries; then peak RSS (VmHWM) as
JSON (augmentation and the stain in the workers are per-batch work, off to keep it fast). Arguments: the folder, data.cache. The model builders (timm) are
not imported: they would only raise the baseline the growth is measured against."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from her2exp import data, reports
from her2exp.cli.common import compose
from her2exp.stain import pipeline


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise KeyError("VmHWM")


def main(root: str, cache: str) -> None:
    torch.set_num_threads(1)  # as in a DataLoader worker; intra-op threads only add contention
    cfg = compose(
        "train",
        [
            "experiment=smoke", "tracking=off", "data=folder", f"data.root={root}",
            "data.image_size=128", "data.patient_regex='^(p[0-9]+)_'", f"data.cache={cache}",
            "data.mean=[0.5,0.5,0.5]", "data.std=[0.25,0.25,0.25]", "stain=macenko",
            "stain.fit_patches=64", "data.augment=false", "evaluation.gallery_max=4",
        ],
    )  # fmt: skip
    bundle = data.build(cfg.data, cfg.seed)
    stain = pipeline.build(cfg.stain, bundle.view("train"), cfg.seed)
    train = data.make_dataset(bundle, "train", cfg.data, cfg.seed)
    loader = data.train_loader(train, cfg.data, cfg.seed, 0, 1, torch.device("cpu"))
    seen = 0
    for x, _, _ in loader:
        seen += len(x)
    labels = bundle.labels("test")
    scores = np.random.default_rng(0).random(len(labels))
    with tempfile.TemporaryDirectory() as out:
        galleries = {"test": (bundle.view("test"), labels, scores, 0.5)}
        drawn = reports._plot_galleries(Path(out), galleries, cfg.evaluation.gallery_max)
    fitted = stain is not None and stain.normalizer is not None
    print(json.dumps({"peak": peak_rss(), "seen": seen, "galleries": len(drawn), "fit": fitted}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

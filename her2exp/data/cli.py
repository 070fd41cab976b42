"""`her2exp-manifest`: a folder tree of patches -> a manifest CSV to check and edit.

    her2exp-manifest /path/patches                       # -> /path/patches/manifest.csv
    her2exp-manifest /path/patches --out cohort.csv --patient-regex '^([^_]+)_' --seed 42
    her2exp-manifest --export-synthetic outputs/demo_folder --n-patients 40

The folder is read and validated exactly as `data=folder` reads it (every file decoded), then
patients are split as training would split them with the same seed (`--seed`, default 42: the
training default). The CSV (path, label, patient_id, slide_id, site, split; paths relative to the
CSV) trains with `her2exp-train data=manifest data.path=manifest.csv`: edit the split column to
fix the split. `--export-synthetic` renders the embedded generator to a PNG folder tree plus
manifest.csv, to try the user-data path without data of your own.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from her2exp.config import DataConfig
from her2exp.data import sources


def _mapping(text: str) -> dict[str, int]:
    """ "her2_neg=0,her2_pos=1" -> {"her2_neg": 0, "her2_pos": 1}."""
    out: dict[str, int] = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, sep, value = item.rpartition("=")
        if not sep or value not in ("0", "1"):
            raise argparse.ArgumentTypeError(f"{item!r}: expected NAME=0 or NAME=1")
        out[name.strip()] = int(value)
    if not out:
        raise argparse.ArgumentTypeError("empty map")
    return out


def _fractions(text: str) -> tuple[float, float, float]:
    parts = [float(t) for t in text.split(",")]
    if len(parts) != 3 or min(parts) <= 0 or abs(sum(parts) - 1) > 1e-6:
        raise argparse.ArgumentTypeError(f"{text!r}: three fractions > 0 summing to 1")
    return parts[0], parts[1], parts[2]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="her2exp-manifest",
        description="Write a manifest CSV (path,label,patient_id,slide_id,site,split) from a "
        "folder of class sub-folders, or export the embedded synthetic data as such a folder.",
    )
    p.add_argument("root", nargs="?", help="folder with class (or HER2 score) sub-folders")
    p.add_argument("--out", help="manifest to write (default: ROOT/manifest.csv)")
    p.add_argument("--label-map", type=_mapping, help="folder names, e.g. her2_neg=0,her2_pos=1")
    p.add_argument("--score-map", type=_mapping, help="scores, e.g. 0=0,1+=0,3+=1")
    p.add_argument("--equivocal", choices=("exclude", "positive", "negative"), default="exclude")
    p.add_argument("--patient-regex", help="patient id from the file name (group 1 or 'patient')")
    p.add_argument("--seed", type=int, default=42, help="split seed (training's default: 42)")
    p.add_argument("--split", type=_fractions, default=(0.7, 0.15, 0.15), help="train,val,test")
    p.add_argument("--image-size", type=int, default=64, help="decode check size (default 64)")
    p.add_argument(
        "--skip-bad", action="store_true", help="leave bad files out (listed) instead of failing"
    )
    g = p.add_argument_group("synthetic export")
    g.add_argument("--export-synthetic", metavar="OUT_DIR", help="write PNG folder + manifest")
    g.add_argument("--n-patients", type=int, default=40)
    g.add_argument("--patches-per-patient", type=int, default=12)
    g.add_argument("--layout", choices=("labels", "scores"), default="labels")
    return p


def folder_config(args: argparse.Namespace) -> DictConfig:
    """The `data=folder` config these arguments stand for."""
    cfg = OmegaConf.structured(DataConfig)
    cfg.source = "folder"
    cfg.root = str(args.root)
    cfg.equivocal = args.equivocal
    cfg.patient_regex = args.patient_regex
    cfg.image_size = args.image_size
    cfg.on_bad_file = "skip" if args.skip_bad else "error"
    cfg.split.train, cfg.split.val, cfg.split.test = args.split
    if args.label_map:
        cfg.label_map = args.label_map  # replaces the default map, unlike a merge
    if args.score_map:
        cfg.score_map = args.score_map
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.export_synthetic:
        manifest = sources.export_synthetic(
            args.export_synthetic,
            n_patients=args.n_patients,
            patches_per_patient=args.patches_per_patient,
            image_size=args.image_size,
            seed=args.seed,
            layout=args.layout,
        )
        n = args.n_patients * args.patches_per_patient
        print(f"her2exp-manifest: wrote {n} PNG patches and {manifest}")
        return 0
    if not args.root:
        parser().error("give a folder (ROOT) or --export-synthetic OUT_DIR")
    cfg = folder_config(args)
    if "2+" in cfg.score_map:
        parser().error("--score-map: leave 2+ out, --equivocal decides it")
    try:
        loaded = sources.load(cfg, args.seed, keep_images=False)
    except ValueError as exc:
        print(f"her2exp-manifest: {exc}", file=sys.stderr)
        return 1
    out = Path(args.out) if args.out else Path(args.root) / "manifest.csv"
    sources.write_manifest(loaded, out)
    counts = loaded.manifest.groupby(["split", "label"]).size().to_dict()
    summary = ", ".join(
        f"{s}: {counts.get((s, 1), 0)} HER2+ / {counts.get((s, 0), 0)} HER2-"
        for s in ("train", "val", "test")
    )
    print(f"her2exp-manifest: wrote {len(loaded.manifest)} rows to {out} ({summary})")
    if len(loaded.skipped):
        skipped = out.with_suffix(".skipped.csv")
        loaded.skipped.to_csv(skipped, index=False)
        print(f"her2exp-manifest: left out {len(loaded.skipped)} bad files, listed in {skipped}")
    print(f"her2exp-manifest: train on it with: her2exp-train data=manifest data.path={out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

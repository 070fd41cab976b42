"""`her2exp-prepare` / `make prepare`: stain-normalise a data set once, so training pays nothing
per epoch. Writes PNGs, a manifest that `data=manifest` reads, the fitted reference and the
parameters used (prepare.json), so the prepared set records how it was made.

    her2exp-prepare out=DIR data=folder data.root=/path/patches [stain.reference=ref.png]
    her2exp-prepare out=DIR data=manifest data.path=cohort.csv stain.rescale=all
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

from her2exp import checkpoint, data, reports
from her2exp.config import ConfigError, register_configs, validate
from her2exp.stain import pipeline as stain_pipeline

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def prepare(overrides: list[str], out: Path) -> dict:
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=["stain=macenko", *overrides,
                                                      f"output_dir={out}"])  # fmt: skip
    validate(cfg)
    if cfg.stain.name not in ("macenko", "macenko_jitter"):
        raise ConfigError(f"stain={cfg.stain.name}: her2exp-prepare normalises with stain=macenko")
    try:
        bundle = data.build_cohort(cfg.data, cfg.seed)
        stain = stain_pipeline.build(cfg.stain, bundle.images, cfg.seed)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    out.mkdir(parents=True, exist_ok=True)
    images = torch.from_numpy(bundle.images).permute(0, 3, 1, 2)
    manifest = bundle.manifest.drop(columns=["split", "latent_score"], errors="ignore").copy()
    paths, skipped = [], 0
    for start in range(0, len(images), 256):
        normed, info = stain.normalizer.normalize(images[start : start + 256])
        skipped += info.n_skipped
        for j, patch in enumerate(normed.permute(0, 2, 3, 1).numpy()):
            i = start + j
            rel = Path("images") / f"{i:06d}_{manifest.iloc[i]['patient_id']}.png"
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(patch).save(out / rel)
            paths.append(str(rel))
    if "path" in manifest:
        manifest = manifest.rename(columns={"path": "source_path"})
    manifest.insert(0, "path", paths)
    reports.atomic_write_text(out / "manifest.csv", manifest.to_csv(index=False))
    state = stain.state_dict()
    checkpoint.save(state, out / "stain_reference.pt")
    record = {
        "stain": OmegaConf.to_container(cfg.stain, resolve=True),
        "reference_stain_matrix": state["normalizer"]["stain_matrix"].tolist(),
        "reference_max_concentrations": state["normalizer"]["max_concentrations"].tolist(),
        "source": OmegaConf.to_container(cfg.data, resolve=True),
        "source_fingerprint": bundle.fingerprint,
        "n_patches": len(paths),
        "n_left_unchanged": skipped,
        "seed": cfg.seed,
    }
    reports.atomic_write_text(out / "prepare.json", json.dumps(record, indent=2) + "\n")
    return record


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    outs = [a for a in args if a.startswith("out=")]
    if not outs:
        print("usage: her2exp-prepare out=DIR [data=... data.root=...] [stain.*=...]",
              file=sys.stderr)  # fmt: skip
        raise SystemExit(2)
    out = Path(outs[-1][len("out=") :])
    try:
        record = prepare([a for a in args if not a.startswith("out=")], out)
    except ConfigError as exc:
        print(f"her2exp: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"her2exp: {record['n_patches']} patches normalised ({record['n_left_unchanged']} left "
          f"unchanged) -> {out / 'manifest.csv'}; train with data=manifest "
          f"data.path={out / 'manifest.csv'}")  # fmt: skip


if __name__ == "__main__":
    main()

"""The values a string option allows, each tuple named once, so that a schema, its check and the
library that acts on the value (a reader, an exporter, an aggregation) agree on one list.

Pure data with no imports: low floors (slides.reader, apps.export) take their lists from here.
"""

from __future__ import annotations

# -- training: model, loss, data ------------------------------------------------------------------
AMP_CHOICES = ("auto", "bf16", "fp16", "off")
LOSS_CHOICES = ("ce", "focal")
DATA_SOURCES = ("synthetic", "folder", "manifest", "slides")
EQUIVOCAL_CHOICES = ("exclude", "positive", "negative")
PATIENT_LABEL_CHOICES = ("error", "max", "majority")
VERIFY_CHOICES = ("header", "full")
FINETUNE_CHOICES = ("full", "frozen", "last_n_blocks")
HEAD_CHOICES = ("linear", "mlp", "knn")
EMBEDDING_CHOICES = ("pooled", "cls_mean")
SPLIT_BY_CHOICES = ("patient", "site")
STAIN_CHOICES = ("none", "macenko", "hed_jitter", "macenko_jitter")
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
SEED_MAX = 2**32 - 1  # numpy's seeds

# -- evaluation -----------------------------------------------------------------------------------
AGGREGATION_CHOICES = ("mean", "max", "topk_mean")  # metrics.AGGREGATIONS
LEVEL_CHOICES = ("tile", "slide", "patient")  # metrics.LEVELS
#: evaluation.tta and evaluation.calibration (engine.tta_views, metrics.fit_temperature).
TTA_CHOICES = ("none", "d4")
CALIBRATION_CHOICES = ("none", "temperature")

# -- bags and probes ------------------------------------------------------------------------------
MIL_CHOICES = ("none", "mean_pool", "max_pool", "abmil")
BAG_BY_CHOICES = ("patient", "slide")
PROBE_CHOICES = ("none", "linear", "knn", "abmil")

# -- commands -------------------------------------------------------------------------------------
#: tiles.reader of her2exp-tile: the slide readers her2exp.slides.reader opens a slide with.
READERS = ("auto", "openslide", "tiffslide")

"""Bag-level (multiple-instance) models on cached tile embeddings: a patient's or a slide's tiles
as one bag with one HER2 label (`mil=...`; docs/architecture.md, "Bags (MIL)"). :mod:`bags`
groups and pads them, :mod:`heads` holds the pooling heads (mean, max, gated attention),
:mod:`report` and :mod:`predict` take them through the evaluation path, :mod:`outputs` draws
their attention (galleries, slide heatmaps)."""

"""Bag-level (multiple-instance) models on cached tile embeddings: a patient's or a slide's tiles
as one bag with one HER2 label. :mod:`heads` holds the pooling heads (mean, max, gated
attention), :mod:`outputs` what is drawn from their attention (galleries, slide heatmaps)."""

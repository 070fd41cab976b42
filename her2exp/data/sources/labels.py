"""Class names and HER2 scores -> the binary label, shared by the folder and manifest sources
(and the tile command's slide labels), so a folder named `3+` and a manifest row scored `3`
mean the same thing everywhere."""

from __future__ import annotations

from omegaconf import DictConfig

SCORES = ("0", "1+", "2+", "3+")
EQUIVOCAL_SCORE = "2+"


def label_of(name: str, cfg: DictConfig, column: str = "folder") -> tuple[int | None, str]:
    """(label, HER2 score) of a class name or score; label None means "excluded 2+".

    Class names go through `data.label_map` (case-insensitive), then HER2 scores (0, 1+, 2+, 3+)
    through `data.score_map`, with 2+ decided by `data.equivocal`. A manifest's `label` column
    also takes 0 and 1 as they are; in a `score` column the bare digits 1, 2, 3 stand for 1+, 2+,
    3+ (a folder named 1 is not a label: 1+ is HER2-). Raises KeyError for anything else.
    """
    text = str(name).strip()
    score_column = column == "score"
    if column == "label" and text in ("0", "1"):
        return int(text), ""
    label_map = {str(k): int(v) for k, v in cfg.label_map.items()}
    folded = {k.casefold(): v for k, v in label_map.items()}
    if not score_column:
        if text in label_map:
            return label_map[text], ""
        if text.casefold() in folded:
            return folded[text.casefold()], ""
    score = f"{text}+" if score_column and text in ("1", "2", "3") else text
    score_map = {str(k): int(v) for k, v in cfg.score_map.items()}
    if score in score_map:
        return score_map[score], score
    if score == EQUIVOCAL_SCORE:
        return {"exclude": None, "positive": 1, "negative": 0}[cfg.equivocal], score
    raise KeyError(text)


def allowed_labels(cfg: DictConfig, column: str = "folder") -> str:
    """The names `label_of` accepts in `column`, for an "unknown label" message."""
    names = [] if column == "score" else [str(k) for k in cfg.label_map]
    if column == "label":
        names = ["0", "1", *names]
    return ", ".join(dict.fromkeys(names + list(SCORES)))

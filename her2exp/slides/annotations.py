"""QuPath GeoJSON regions: which tiles of a slide a pathologist included or excluded.

Why a reader of its own: an annotation file is drawn by hand and exported by more than one tool
and QuPath version, so the tiler must check it with the slides (before anything is written)
and refuse a bad one in one line naming the file and the feature, never with a traceback
from deep inside the tiling. What is read:

- the root: a FeatureCollection (QuPath "Export as FeatureCollection"), a list of features
  (older "Export objects"), a single Feature, or a bare geometry (GeoJSON allows it: one
  unclassified region, so an include region);
- a feature's class: `properties.classification` as QuPath 0.2+ writes it (`{"name": ...,
  "color": ...}`), a plain string (older QuPath and other tools), or absent (unclassified).
  A class in `exclude_classes` (case-insensitive) excludes; any other class includes;
- area geometries: Polygon (holes respected), MultiPolygon, and the polygons of a
  GeometryCollection;
- ignored, with a note naming the feature (the tiler logs the notes once per file): geometries
  without area (Point, MultiPoint, LineString, MultiLineString: QuPath's points and polylines
  mark, they do not outline) and QuPath detections, cells and tiles (`objectType`: computed
  objects exported with the annotations, not regions a person drew).

Anything else is refused (AnnotationError): not JSON (line and column named), an unexpected
root, a feature without geometry, an unknown geometry type, an empty polygon, a ring of fewer
than 3 points or with a coordinate that is not a number, a classification that is neither a
string nor an object with a string `name`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

NO_AREA = ("Point", "MultiPoint", "LineString", "MultiLineString")
NOT_DRAWN = ("detection", "cell", "tile")  # QuPath objectTypes computed, not drawn
MAX_NOTED = 5  # features named in a note; the rest are counted


class AnnotationError(ValueError):
    """An annotation file that cannot be used, in one line naming it (and the feature)."""


class _Problem(ValueError):
    """What is wrong inside one feature; AnnotationError adds the file and the feature."""


@dataclass(frozen=True, eq=False)
class Region:
    """One polygon in level-0 pixels: its outer ring and its holes, each an (n, 2) array."""

    outer: np.ndarray
    holes: tuple[np.ndarray, ...] = ()

    def contains(self, points: np.ndarray) -> np.ndarray:
        """Which of the (m, 2) points lie inside the outer ring and in none of its holes."""
        from matplotlib.path import Path as Polygon

        hit = Polygon(self.outer).contains_points(points)
        for hole in self.holes:
            hit &= ~Polygon(hole).contains_points(points)
        return hit


@dataclass(frozen=True, eq=False)
class Regions:
    """A checked annotation file: its include and exclude regions (picklable, for workers) and
    notes on the features it ignored."""

    path: str
    include: tuple[Region, ...] = ()
    exclude: tuple[Region, ...] = ()
    ignored: tuple[str, ...] = field(default=())

    def keep(self, x: np.ndarray, y: np.ndarray, step: float) -> np.ndarray:
        """Tiles (top-left x, y, side `step`, level 0) whose centre lies in an include region,
        when there is any, and in no exclude region."""
        centres = np.stack([np.asarray(x) + step / 2, np.asarray(y) + step / 2], axis=1)
        centres = centres.astype(float).reshape(-1, 2)
        keep = _inside(self.include, centres) if self.include else np.ones(len(centres), bool)
        return keep & ~_inside(self.exclude, centres)

    def note(self) -> str:
        """One line on the ignored features ('' when none): what the tiler logs for the file."""
        if not self.ignored:
            return ""
        named = "; ".join(self.ignored[:MAX_NOTED])
        more = len(self.ignored) - MAX_NOTED
        rest = f"; and {more} more" if more > 0 else ""
        return f"annotation {self.path}: ignored {len(self.ignored)} feature(s): {named}{rest}"


def _inside(regions: Iterable[Region], points: np.ndarray) -> np.ndarray:
    hit = np.zeros(len(points), bool)
    for region in regions:
        hit |= region.contains(points)
    return hit


def read_regions(path: str | Path, exclude_classes: Iterable[str]) -> Regions:
    """The include and exclude regions of a QuPath GeoJSON file; AnnotationError, in one line
    naming the file and the feature, when it cannot be used (see the module docstring)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno}, column {exc.colno}"
        raise AnnotationError(f"annotation {path}: not valid JSON ({where}: {exc.msg})") from exc
    except UnicodeDecodeError as exc:
        raise AnnotationError(f"annotation {path}: not UTF-8 text ({exc.reason})") from exc
    except OSError as exc:
        raise AnnotationError(f"annotation {path}: unreadable ({exc.strerror})") from exc
    excluded = {str(c).casefold() for c in exclude_classes}
    include: list[Region] = []
    exclude: list[Region] = []
    ignored: list[str] = []
    for i, feature in enumerate(_features(data, path)):
        name = _feature_name(i, feature)
        try:
            why, polygons, cls = _read_feature(feature)
        except _Problem as exc:
            raise AnnotationError(f"annotation {path}: {name}: {exc}") from None
        if why:
            ignored.append(f"{name}: {why}")
        target = exclude if cls is not None and cls.casefold() in excluded else include
        target.extend(polygons)
    return Regions(str(path), tuple(include), tuple(exclude), tuple(ignored))


def _features(data: Any, path: str | Path) -> list[Any]:
    """The root's features: a FeatureCollection's, a list's, a Feature or a bare geometry."""
    if isinstance(data, list):
        return data
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise AnnotationError(
            f"annotation {path}: the root is a JSON {kind}, not a FeatureCollection, a Feature"
            " or a list of features"
        )
    kind = data.get("type")
    if kind == "FeatureCollection" or (kind is None and "features" in data):
        features = data.get("features")
        if not isinstance(features, list):
            raise AnnotationError(f"annotation {path}: its 'features' is not a list")
        return features
    if kind == "Feature":
        return [data]
    if kind in (*NO_AREA, "Polygon", "MultiPolygon", "GeometryCollection"):
        return [{"type": "Feature", "geometry": data}]  # a bare geometry: one unclassified region
    raise AnnotationError(
        f"annotation {path}: the root is an object of type {_short(kind)}, not a FeatureCollection,"
        " a Feature or a list of features"
    )


def _feature_name(i: int, feature: Any) -> str:
    """'feature 3' with its QuPath id and name when it has them, so it can be found."""
    if not isinstance(feature, dict):
        return f"feature {i}"
    props = feature.get("properties")
    tags = [f"id {feature['id']!r}"] if isinstance(feature.get("id"), (str, int)) else []
    if isinstance(props, dict) and isinstance(props.get("name"), str):
        tags.append(f"name {props['name']!r}")
    return f"feature {i} ({', '.join(tags)})" if tags else f"feature {i}"


def _read_feature(feature: Any) -> tuple[str, list[Region], str | None]:
    """(why it is ignored or '', its polygons, its class or None); _Problem if unusable."""
    if not isinstance(feature, dict):
        raise _Problem(f"a JSON {type(feature).__name__}, not a GeoJSON Feature object")
    props = feature.get("properties")
    if props is None:
        props = {}
    if not isinstance(props, dict):
        raise _Problem(f"'properties' is a JSON {type(props).__name__}, not an object")
    kind = props.get("objectType")
    if isinstance(kind, str) and kind.casefold() in NOT_DRAWN:
        return f"a QuPath {kind}, not an annotation", [], None
    cls = _class_name(props.get("classification"))
    geometry = feature.get("geometry")
    if geometry is None:
        raise _Problem("has no geometry")
    polygons, no_area = _polygons(geometry)
    if no_area and not polygons:
        return f"a {no_area} (no area)", [], cls
    return "", polygons, cls


def _class_name(classification: Any) -> str | None:
    """A QuPath class: {"name": ...} (0.2+), a plain string (older tools), or none."""
    if classification is None or isinstance(classification, str):
        return classification
    if isinstance(classification, dict):
        name = classification.get("name")
        if isinstance(name, str):
            return name
        raise _Problem(f"its classification's name is {_short(name)}, not a string")
    raise _Problem(f"its classification is {_short(classification)}, not a name or an object")


def _polygons(geometry: Any) -> tuple[list[Region], str]:
    """(the area polygons of a geometry, the type of a geometry without area it holds or '')."""
    if not isinstance(geometry, dict):
        raise _Problem(f"its geometry is a JSON {type(geometry).__name__}, not an object")
    kind = geometry.get("type")
    if kind in NO_AREA:
        return [], kind
    if kind == "GeometryCollection":
        parts = geometry.get("geometries")
        if not isinstance(parts, list) or not parts:
            raise _Problem("an empty GeometryCollection")
        polygons, no_area = [], ""
        for part in parts:
            more, none = _polygons(part)
            polygons += more
            no_area = no_area or none
        return polygons, no_area
    coords = geometry.get("coordinates")
    if kind == "Polygon":
        return [_polygon(coords, "Polygon")], ""
    if kind == "MultiPolygon":
        if not isinstance(coords, list) or not coords:
            raise _Problem("an empty MultiPolygon")
        return [_polygon(p, f"MultiPolygon part {k}") for k, p in enumerate(coords)], ""
    raise _Problem(f"unknown geometry type {_short(kind)} (Polygon, MultiPolygon, points, lines)")


def _polygon(rings: Any, what: str) -> Region:
    """One GeoJSON polygon (outer ring, then holes) checked into a Region."""
    if not isinstance(rings, list) or not rings:
        raise _Problem(f"an empty {what}")
    arrays = [_ring(ring, f"{what} ring {k}") for k, ring in enumerate(rings)]
    return Region(arrays[0], tuple(arrays[1:]))


def _ring(ring: Any, what: str) -> np.ndarray:
    if not isinstance(ring, list):
        raise _Problem(f"{what} is {_short(ring)}, not a list of points")
    if len(ring) < 3:
        raise _Problem(f"{what} has {len(ring)} point(s); a ring needs at least 3")
    for k, point in enumerate(ring):
        if not (isinstance(point, list) and len(point) >= 2 and all(map(_number, point[:2]))):
            raise _Problem(f"{what} point {k} is {_short(point)}, not a pair of numbers")
    return np.asarray([p[:2] for p in ring], dtype=float)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _short(value: Any) -> str:
    """A value as JSON, cut to fit a one-line message."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else f"{text[:37]}..."

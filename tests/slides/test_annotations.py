"""QuPath GeoJSON regions (her2exp.slides.annotations) and their check in `her2exp-tile`.

Issue 31: invalid JSON, a feature without geometry, Point or LineString geometries, an empty
polygon, a list root, a string classification, and a real QuPath export holding one Point
annotation all crashed the tiler with a traceback (with tiles.processes=2 after tiling.json was
written). Now: points and lines are ignored with a note naming the feature, a list root and a
string class are read, and every other problem is refused in one line naming the file and the
feature, with the slides' other problems, before anything is written.
"""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from her2exp.cli.common import compose
from her2exp.cli.tile import main
from her2exp.config.tile import SETTINGS_FILE, TilesConfig
from her2exp.slides.annotations import AnnotationError, read_regions

EXCLUDE = TilesConfig().exclude_classes
SQUARE = [[0, 0], [100, 0], [100, 100], [0, 100], [0, 0]]
HOLE = [[40, 40], [60, 40], [60, 60], [40, 60], [40, 40]]


def feature(geometry, cls=None, **extra) -> dict:
    props = {"objectType": "annotation", **({"classification": cls} if cls else {})}
    return {"type": "Feature", "geometry": geometry, "properties": props, **extra}


def polygon(*rings) -> dict:
    return {"type": "Polygon", "coordinates": list(rings)}


def write(tmp_path: Path, data, name: str = "a.geojson") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def kept(regions, *points) -> list[bool]:
    """Which points are kept, each the centre of a 2 px tile."""
    xy = np.asarray(points, float) - 1
    return regions.keep(xy[:, 0], xy[:, 1], 2).tolist()


def test_a_qupath_export_with_a_point_among_polygons_keeps_the_polygons_and_notes_the_point(
    tmp_path,
) -> None:
    """QuPath 0.4+'s FeatureCollection: ids, objectType, class {name, color}; one Point."""
    export = {"type": "FeatureCollection", "features": [
        feature(polygon(SQUARE, HOLE), {"name": "Tumor", "color": [200, 0, 0]}, id="t-1"),
        feature({"type": "Point", "coordinates": [10, 10]}, {"name": "Tumor"}, id="p-7"),
        feature(polygon([[0, 0], [20, 0], [20, 20], [0, 0]]), {"name": "Pen", "color": [0, 0, 0]}),
    ]}  # fmt: skip
    regions = read_regions(write(tmp_path, export), EXCLUDE)
    assert (len(regions.include), len(regions.exclude)) == (1, 1)
    # inside, in the hole, in the pen mark, outside
    assert kept(regions, (80, 30), (50, 50), (15, 5), (150, 50)) == [True, False, False, False]
    assert regions.ignored == ("feature 1 (id 'p-7'): a Point (no area)",)
    assert regions.note() == (
        f"annotation {tmp_path / 'a.geojson'}: ignored 1 feature(s): "
        "feature 1 (id 'p-7'): a Point (no area)"
    )
    again = pickle.loads(pickle.dumps(regions))  # what a tiling worker receives
    assert kept(again, (80, 30), (50, 50)) == [True, False]


def test_a_list_root_a_string_class_and_other_area_geometries_are_read(tmp_path) -> None:
    """Older exports: a list of features and `"classification": "Pen"`; a MultiPolygon and a
    GeometryCollection's polygons count; lines and multipoints are ignored with a note."""
    far = [[[200, 0], [300, 0], [300, 100], [200, 0]]]
    features = [
        {"type": "Feature", "geometry": {"type": "MultiPolygon", "coordinates": [[SQUARE], far]}},
        feature(polygon(HOLE), "Pen"),  # older QuPath: the class as a string
        feature({"type": "GeometryCollection", "geometries": [
            polygon([[500, 500], [600, 500], [600, 600], [500, 500]]),
            {"type": "Point", "coordinates": [1, 1]},
        ]}),
        feature({"type": "LineString", "coordinates": [[0, 0], [5, 5]]}, properties={"name": "cut"}),
        {**feature({"type": "MultiLineString", "coordinates": []}),
         "properties": {"name": "edge", "classification": None}},
        feature({"type": "MultiPoint", "coordinates": [[1, 2]]}),
        feature(polygon([[0, 0], [9, 0], [9, 9]]), properties={"objectType": "cell"}),
    ]  # fmt: skip
    regions = read_regions(write(tmp_path, features), ["pen"])  # classes match any case
    assert (len(regions.include), len(regions.exclude)) == (3, 1)
    assert kept(regions, (10, 10), (50, 50), (290, 50), (590, 510), (150, 50)) == [
        True, False, True, True, False,
    ]  # fmt: skip
    assert regions.ignored == (
        "feature 3 (name 'cut'): a LineString (no area)",
        "feature 4 (name 'edge'): a MultiLineString (no area)",
        "feature 5: a MultiPoint (no area)",
        "feature 6: a QuPath cell, not an annotation",
    )


def test_points_and_lines_alone_keep_every_tile_and_a_bare_geometry_is_one_region(
    tmp_path,
) -> None:
    lines = feature({"type": "LineString", "coordinates": [[0, 0], [5, 5]]})
    regions = read_regions(write(tmp_path, {"type": "FeatureCollection", "features": [lines]}), [])
    assert kept(regions, (10, 10), (900, 900)) == [True, True] and regions.note()
    bare = read_regions(write(tmp_path, polygon(SQUARE)), [])
    assert kept(bare, (10, 10), (900, 900)) == [True, False] and not bare.note()


BAD = {
    "invalid JSON": ('{"type": "FeatureCollection",\n "features": [}', "not valid JSON (line 2, column 15: "),
    "a number root": ("3", "the root is a JSON int, not a FeatureCollection"),
    "an odd root": ({"type": "Topology"}, "the root is an object of type \"Topology\""),
    "features not a list": ({"type": "FeatureCollection", "features": {}}, "its 'features' is not a list"),
    "no geometry": ([feature(polygon(SQUARE)), {"type": "Feature", "id": "x1", "properties": {"name": "T"}}],
                    "feature 1 (id 'x1', name 'T'): has no geometry"),
    "null geometry": ([feature(None)], "feature 0: has no geometry"),
    "empty polygon": ([feature(polygon())], "feature 0: an empty Polygon"),
    "empty multipolygon": ([feature({"type": "MultiPolygon", "coordinates": []})], "feature 0: an empty MultiPolygon"),
    "two points": ([feature(polygon([[0, 0], [1, 1]]))], "feature 0: Polygon ring 0 has 2 point(s); a ring needs at least 3"),
    "text coordinate": ([feature(polygon(SQUARE, [[1, 1], [2, "x"], [3, 1]]))],
                        "feature 0: Polygon ring 1 point 1 is [2, \"x\"], not a pair of numbers"),
    "unknown type": ([feature({"type": "Circle", "coordinates": [0, 0]})], "feature 0: unknown geometry type \"Circle\""),
    "class name not text": ([feature(polygon(SQUARE), {"name": 3})], "feature 0: its classification's name is 3, not a string"),
    "class a number": ([feature(polygon(SQUARE), 7)], "feature 0: its classification is 7, not a name"),
    "feature a string": (["Polygon"], "feature 0: a JSON str, not a GeoJSON Feature object"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD))
def test_every_other_problem_is_one_line_naming_the_file_and_the_feature(tmp_path, case) -> None:
    data, why = BAD[case]
    path = write(tmp_path, data)
    with pytest.raises(AnnotationError) as info:
        read_regions(path, EXCLUDE)
    message = str(info.value)
    assert message.startswith(f"annotation {path}: {why}") and "\n" not in message, message


# -- her2exp-tile, in-process --------------------------------------------------------------------
def table_with(slide_cohort, tmp_path: Path, annotations: dict[int, object]) -> Path:
    """The cohort's slide table, slide i annotated with annotations[i] (written next to it)."""
    folder, cohort = slide_cohort
    table = cohort.table.assign(path=[str(folder / p) for p in cohort.table["path"]])
    table["annotation"] = ""
    for i, data in annotations.items():
        table.loc[i, "annotation"] = write(tmp_path, data, f"a{i}.geojson").name
    table.to_csv(tmp_path / "slides.csv", index=False)
    return tmp_path / "slides.csv"


def tile(table: Path, out: Path, *overrides: str) -> None:
    main(compose("tile", [f"input={table}", f"out={out}", "tiles.size=128", *overrides]))


def test_bad_annotations_are_named_with_the_slides_before_anything_is_written(
    slide_cohort, tmp_path, capsys
) -> None:
    """With tiles.processes=2 too (the crash came after tiling.json); skip leaves them out."""
    csv = table_with(slide_cohort, tmp_path, {0: "{", 1: [feature(None)], 2: [feature(polygon())]})
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        tile(csv, tmp_path / "out", "tiles.processes=2")
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith("her2exp: ") and "3 problems" in err, err
    assert f"annotation {tmp_path / 'a0.geojson'}: not valid JSON (line 1, column 2: " in err
    assert f"annotation {tmp_path / 'a1.geojson'}: feature 0: has no geometry" in err
    assert f"annotation {tmp_path / 'a2.geojson'}: feature 0: an empty Polygon" in err
    assert not (tmp_path / "out").exists()
    tile(csv, tmp_path / "out", "tiles.processes=2", "on_bad_file=skip")
    summary = pd.read_csv(tmp_path / "out" / "summary.csv", keep_default_na=False)
    reasons = dict(zip(summary["slide_id"], summary["reason"], strict=True))
    ids = slide_cohort[1].table["slide_id"]
    assert [reasons[s] for s in ids[:3]] == [
        f"annotation {tmp_path / 'a0.geojson'}: not valid JSON (line 1, column 2: Expecting"
        " property name enclosed in double quotes)",
        f"annotation {tmp_path / 'a1.geojson'}: feature 0: has no geometry",
        f"annotation {tmp_path / 'a2.geojson'}: feature 0: an empty Polygon",
    ]
    tiles = pd.read_parquet(tmp_path / "out" / "tiles.parquet")
    assert set(tiles["slide_id"]) == set(ids[3:]) and (tmp_path / "out" / SETTINGS_FILE).is_file()


def test_a_qupath_export_with_a_point_is_tiled_with_a_note(slide_cohort, tmp_path, caplog):
    """An older export (a list, string classes) with a Point: its polygons include and
    exclude as in test_qupath_regions_include_and_exclude_tiles, the Point is noted once."""
    half = [[0, 0], [512, 0], [512, 768], [0, 768], [0, 0]]
    pen = [[0, 0], [256, 0], [256, 256], [0, 256], [0, 0]]
    export = [
        feature(polygon(half), "Tumor"),
        feature({"type": "Point", "coordinates": [700, 300]}, properties={"name": "mitosis"}),
        feature(polygon(pen), "Pen"),
    ]
    csv = table_with(slide_cohort, tmp_path, {0: export})
    pd.read_csv(csv).iloc[:1].to_csv(csv, index=False)
    with caplog.at_level(logging.WARNING, logger="her2exp"):
        tile(csv, tmp_path / "out")
    notes = [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]
    assert notes == [
        f"annotation {tmp_path / 'a0.geojson'}: ignored 1 feature(s): "
        "feature 1 (name 'mitosis'): a Point (no area)"
    ]
    tiles = pd.read_parquet(tmp_path / "out" / "tiles.parquet")
    cx, cy = tiles["x"] + 64, tiles["y"] + 64
    assert len(tiles) and (cx < 512).all() and not ((cx < 256) & (cy < 256)).any()

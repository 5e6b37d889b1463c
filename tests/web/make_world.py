"""Regenerates the dashboard's world outline, `src/egressd/control/web/ui/world.js`.

Not a test: a tool kept next to the UI tests. Its input is `land-110m.json` of the npm
package world-atlas 2.0.2 (ISC licence; Natural Earth 1:110m land, public domain):

    npm pack world-atlas@2.0.2 && tar xzf world-atlas-2.0.2.tgz
    python3 tests/web/make_world.py package/land-110m.json

The TopoJSON arcs are decoded, each ring is simplified (Douglas-Peucker, 0.35 degrees) and
written as one SVG path in equirectangular coordinates: x = longitude, y = -latitude, so
the map needs no projection code beyond that. Rings smaller than a few pixels are dropped.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

TOLERANCE = 0.35  # degrees
MIN_EXTENT = 1.2  # degrees: smaller islands are dropped
OUT = Path(__file__).resolve().parents[2] / "src/egressd/control/web/ui/world.js"

Point = tuple[float, float]


def decode_arcs(topology: dict[str, Any]) -> list[list[Point]]:
    scale_x, scale_y = topology["transform"]["scale"]
    shift_x, shift_y = topology["transform"]["translate"]
    arcs: list[list[Point]] = []
    for arc in topology["arcs"]:
        x = y = 0
        points = []
        for dx, dy in arc:
            x, y = x + dx, y + dy
            points.append((x * scale_x + shift_x, y * scale_y + shift_y))
        arcs.append(points)
    return arcs


def ring(arcs: list[list[Point]], indexes: list[int]) -> list[Point]:
    points: list[Point] = []
    for index in indexes:
        arc = arcs[index] if index >= 0 else list(reversed(arcs[~index]))
        points.extend(arc if not points else arc[1:])
    return points


def simplify(points: list[Point], tolerance: float) -> list[Point]:
    if len(points) < 3:
        return points
    keep = [False] * len(points)
    keep[0] = keep[-1] = True
    stack = [(0, len(points) - 1)]
    while stack:
        first, last = stack.pop()
        (ax, ay), (bx, by) = points[first], points[last]
        length = ((bx - ax) ** 2 + (by - ay) ** 2) ** 0.5
        worst, worst_distance = -1, tolerance
        for index in range(first + 1, last):
            px, py = points[index]
            if length == 0:
                distance = ((px - ax) ** 2 + (py - ay) ** 2) ** 0.5
            else:
                distance = abs((bx - ax) * (ay - py) - (ax - px) * (by - ay)) / length
            if distance > worst_distance:
                worst, worst_distance = index, distance
        if worst > 0:
            keep[worst] = True
            stack += [(first, worst), (worst, last)]
    return [point for point, kept in zip(points, keep, strict=True) if kept]


def number(value: float) -> str:
    text = f"{value:.1f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def main(source: str) -> None:
    topology = json.loads(Path(source).read_text())
    arcs = decode_arcs(topology)
    parts: list[str] = []
    for geometry in topology["objects"]["land"]["geometries"]:
        polygons = geometry["arcs"] if geometry["type"] == "MultiPolygon" else [geometry["arcs"]]
        for polygon in polygons:
            for indexes in polygon:
                points = ring(arcs, indexes)
                xs, ys = [p[0] for p in points], [p[1] for p in points]
                if max(max(xs) - min(xs), max(ys) - min(ys)) < MIN_EXTENT:
                    continue
                simple = simplify(points, TOLERANCE)
                if len(simple) < 4:
                    continue
                coords = [f"{number(x)} {number(-y)}" for x, y in simple[:-1]]
                parts.append("M" + "L".join(coords) + "Z")
    path = "".join(parts)
    OUT.write_text(
        "// World land outline for the dashboard map: x = longitude, y = -latitude (degrees).\n"
        "// Derived from Natural Earth 1:110m land (public domain) as packaged in the npm\n"
        "// package world-atlas 2.0.2 (ISC licence, Copyright 2013-2019 Michael Bostock),\n"
        "// simplified by tests/web/make_world.py. Regenerate with that script.\n"
        f"export const LAND = \"{path}\";\n")
    print(f"{OUT}: {len(parts)} rings, {len(path)} bytes")


if __name__ == "__main__":
    main(sys.argv[1])

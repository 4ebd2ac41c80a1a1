"""Draw an API-format workflow JSON as a picture of its graph: nodes in columns by depth, links as lines.

A rendering of the JSON, not a screenshot of ComfyUI's editor (which needs a browser). Needs Pillow only.

    python comfyui/ditserve_nodes/render_workflow.py workflows/integrated_digits.json docs/integrated_digits.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw

BOX_W, LINE_H, GAP_X, GAP_Y, PAD = 250, 14, 70, 24, 20
OURS, THEIRS = (255, 226, 170), (214, 228, 250)  # ditserve nodes orange, ComfyUI's blue


def _depths(workflow: dict) -> dict[str, int]:
    depth: dict[str, int] = {}

    def visit(node: str) -> int:
        if node not in depth:
            links = [v[0] for v in workflow[node]["inputs"].values() if isinstance(v, list)]
            depth[node] = 1 + max((visit(str(n)) for n in links), default=-1)
        return depth[node]

    for node in workflow:
        visit(node)
    return depth


def _lines(node: dict) -> list[str]:
    shown = [f"{k}: {v}" for k, v in node["inputs"].items() if not isinstance(v, list)]
    return [node["class_type"], *[s if len(s) <= 36 else s[:33] + "..." for s in shown]]


def render(workflow: dict, title: str) -> Image.Image:
    depth = _depths(workflow)
    columns: dict[int, list[str]] = {}
    for node in sorted(workflow, key=lambda n: (depth[n], int(n) if n.isdigit() else 0)):
        columns.setdefault(depth[node], []).append(node)
    boxes, height = {}, 0
    for col, nodes in columns.items():
        y = PAD + 30
        for node in nodes:
            h = LINE_H * len(_lines(workflow[node])) + 10
            boxes[node] = (PAD + col * (BOX_W + GAP_X), y, PAD + col * (BOX_W + GAP_X) + BOX_W, y + h)
            y += h + GAP_Y
        height = max(height, y)
    image = Image.new("RGB", (PAD * 2 + len(columns) * (BOX_W + GAP_X) - GAP_X, height + PAD), "white")
    draw = ImageDraw.Draw(image)
    draw.text((PAD, PAD), f"{title}  (rendering of the workflow JSON, not a screenshot)", fill="black")
    for node, spec in workflow.items():
        for value in spec["inputs"].values():
            if isinstance(value, list):
                src, dst = boxes[str(value[0])], boxes[node]
                draw.line([(src[2], (src[1] + src[3]) // 2), (dst[0], (dst[1] + dst[3]) // 2)], fill="gray", width=2)
    for node, (x0, y0, x1, y1) in boxes.items():
        lines = _lines(workflow[node])
        ours = lines[0].startswith("Ditserve")
        draw.rectangle((x0, y0, x1, y1), fill=OURS if ours else THEIRS, outline="black")
        for i, text in enumerate(lines):
            draw.text((x0 + 6, y0 + 5 + i * LINE_H), text, fill="black" if i == 0 else (60, 60, 60))
    return image


def main() -> None:
    source, target = Path(sys.argv[1]), Path(sys.argv[2])
    render(json.loads(source.read_text()), source.stem).save(target)


if __name__ == "__main__":
    main()

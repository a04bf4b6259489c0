"""What a benchmark writes: the result rows, the markdown table, results.json, the FD-T curve plot and image grids.

Every drawing is done with PIL (no plotting library). Images are pixels in [−1, 1], (N, 3, H, W).
"""
from __future__ import annotations

import json
import textwrap
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

from torch import Tensor

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

__all__ = ["MethodResult", "results_markdown", "cost_comparison", "seed_spread", "write_results", "plot_curves",
           "image_grid", "comparison_grid"]


@dataclass
class MethodResult:
    """One table row: the suite's ``accuracy`` (share in [0, 1]), FD to real images, FD-T to the teacher reference
    (None before the reference exists), network evaluations and wall seconds per image; ``extra``: the accuracy's
    parts and training facts (iterations, seconds)."""

    name: str
    accuracy: float
    fd_real: float
    fd_teacher: float | None
    nfe: int
    seconds_per_image: float
    extra: dict = field(default_factory=dict)


def _share(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def results_markdown(results: Sequence[MethodResult], accuracy_name: str = "prompt accuracy",
                     note: str | None = None, reference: str = "teacher 28",
                     parts: Sequence[tuple[str, str]] = ()) -> str:
    """A markdown table of the results (accuracy in %, the accuracy's ``parts`` — (column, ``extra`` key) pairs of
    shares, in % —, FD, FD-T to ``reference``, NFE, ms per image), the comparison at equal cost, the spread over
    training seeds, and ``note`` below it."""
    part_heads = "".join(f" {label} |" for label, _ in parts)
    lines = [f"| method | {accuracy_name} |{part_heads} FD (real) | FD-T ({reference}) | NFE/image | ms/image |",
             "|---|---:|" + "---:|" * len(parts) + "---:|---:|---:|---:|"]
    for r in results:
        fdt = "—" if r.fd_teacher is None else f"{r.fd_teacher:.1f}"
        part_cells = "".join(f" {_share(r.extra.get(key))} |" for _, key in parts)
        lines.append(f"| {r.name} | {100 * r.accuracy:.1f}% |{part_cells} {r.fd_real:.1f} | {fdt} | {r.nfe} | "
                     f"{1000 * r.seconds_per_image:.2f} |")
    lines += cost_comparison(results)
    lines += seed_spread(results, accuracy_name)
    if note:
        lines.append(f"\n{note}")
    return "\n".join(lines) + "\n"


def seed_spread(results: Sequence[MethodResult], accuracy_name: str = "prompt accuracy") -> list[str]:
    """Methods trained with several seeds (rows sharing ``extra["method"]``, each with its ``extra["seed"]``): the
    mean and range of accuracy and FD-T over the seeds, and the FD-T of every method per seed side by side (the
    same seed means the same initial weights of the generator and the same data order, so a row of that table is
    a paired comparison)."""
    groups: dict[str, dict[int, MethodResult]] = {}
    for r in results:
        if "method" in r.extra and "seed" in r.extra and r.fd_teacher is not None:
            groups.setdefault(r.extra["method"], {})[int(r.extra["seed"])] = r
    groups = {m: rows for m, rows in groups.items() if len(rows) > 1}
    if not groups:
        return []
    lines = ["", "Over training seeds (mean, min–max):", "",
             f"| method | seeds | {accuracy_name} | FD-T |", "|---|---:|---:|---:|"]
    for method, rows in groups.items():
        acc = [100 * r.accuracy for r in rows.values()]
        fdt = [float(r.fd_teacher) for r in rows.values() if r.fd_teacher is not None]
        lines.append(f"| {method} | {len(rows)} | {sum(acc) / len(acc):.1f}% ({min(acc):.1f}–{max(acc):.1f}) | "
                     f"{sum(fdt) / len(fdt):.1f} ({min(fdt):.1f}–{max(fdt):.1f}) |")
    seeds = sorted({s for rows in groups.values() for s in rows})
    lines += ["", "FD-T per seed:", "", "| seed | " + " | ".join(groups) + " |", "|---:|" + "---:|" * len(groups)]
    for seed in seeds:
        cells = [f"{rows[seed].fd_teacher:.1f}" if seed in rows else "—" for rows in groups.values()]
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    return lines


def cost_comparison(results: Sequence[MethodResult]) -> list[str]:
    """Each student row (``extra["seed"]`` set) against the teacher rows (``extra["teacher_steps"]`` set): at equal
    cost (the teacher row of the same NFE, with CFG 2 per step) and at the student's own step count (twice its NFE).
    FD-T lower is better. Rows that fall on the same sides share one line (how many, their FD-T range, and
    their names when at most three)."""
    teachers = {r.nfe: (r.name, r.fd_teacher) for r in results
                if "teacher_steps" in r.extra and r.fd_teacher is not None}
    groups: dict[str, list[MethodResult]] = {}
    for r in results:
        if "seed" not in r.extra or r.fd_teacher is None:
            continue
        parts = []
        for nfe, label in ((r.nfe, "same cost"), (2 * r.nfe, "twice the cost")):
            if nfe in teachers:
                t_name, t_fdt = teachers[nfe]
                side = "better" if r.fd_teacher < t_fdt else "not better"
                parts.append(f"{side} than {t_name} ({label}: {t_fdt:.1f})")
        if parts:
            groups.setdefault("; ".join(parts), []).append(r)
    lines = []
    for verdict, rows in groups.items():
        if len(rows) == 1:
            lines.append(f"- {rows[0].name}: FD-T {rows[0].fd_teacher:.1f}, {verdict}")
        else:
            fdt = [float(r.fd_teacher) for r in rows if r.fd_teacher is not None]
            names = f" ({', '.join(r.name for r in rows)})" if len(rows) <= 3 else ""
            lines.append(f"- {len(rows)} student rows{names}: FD-T {min(fdt):.1f}–{max(fdt):.1f}, {verdict}")
    return ["", "Against the teacher's own few-step sampler (FD-T):", *lines] if lines else []


def write_results(out_dir: str | Path, results: Sequence[MethodResult], meta: dict, stem: str = "metrics",
                  accuracy_name: str = "prompt accuracy", note: str | None = None,
                  reference: str = "teacher 28", parts: Sequence[tuple[str, str]] = ()) -> tuple[Path, Path]:
    """``<stem>.json`` ({"meta", "results"}) and ``<stem>.md`` (:func:`results_markdown`) in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    j = out / f"{stem}.json"
    j.write_text(json.dumps({"meta": meta, "results": [asdict(r) for r in results]}, indent=1))
    m = out / f"{stem}.md"
    m.write_text(results_markdown(results, accuracy_name, note, reference, parts))
    return j, m


def _tile(image: Tensor, scale: int):
    from PIL import Image

    arr = ((image.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr).resize((arr.shape[1] * scale, arr.shape[0] * scale), Image.Resampling.NEAREST)


def image_grid(images: Tensor, rows: Sequence[Sequence[int]], scale: int = 2) -> PILImage:
    """A PIL grid: row r holds ``images[j]`` for j in ``rows[r]`` (a suite's layout, e.g. one row per digit)."""
    from PIL import Image

    _, _, h, w = images.shape
    columns = max((len(r) for r in rows), default=0)
    grid = Image.new("RGB", (max(columns, 1) * w * scale, max(len(rows), 1) * h * scale), "white")
    for r, idx in enumerate(rows):
        for c, j in enumerate(idx):
            grid.paste(_tile(images[j], scale), (c * w * scale, r * h * scale))
    return grid


def comparison_grid(columns: Mapping[str, Tensor], indices: Sequence[int], scale: int = 3,
                    wrap: int = 14) -> PILImage:
    """Side by side: one column per method (``columns``: name → its images of the shared set), rows = the same
    prompts ``indices``; a header line of the method names (wrapped at ``wrap`` characters) above them."""
    from PIL import Image, ImageDraw

    if not columns:
        raise ValueError("comparison_grid: no methods to compare")
    first = next(iter(columns.values()))
    _, _, h, w = first.shape
    labels = [textwrap.wrap(name, wrap) or [""] for name in columns]
    line_h, gap = 11, 4
    col_w = max(w * scale, 6 * wrap) + 2 * gap
    row_h = h * scale + gap
    head = gap + line_h * max(len(lab) for lab in labels) + gap
    grid = Image.new("RGB", (col_w * len(columns), head + row_h * len(indices)), "white")
    draw = ImageDraw.Draw(grid)
    for c, (lab, images) in enumerate(zip(labels, columns.values())):
        for k, line in enumerate(lab):
            draw.text((c * col_w + gap, gap + k * line_h), line, fill="black")
        x = c * col_w + (col_w - w * scale) // 2
        for r, j in enumerate(indices):
            grid.paste(_tile(images[j], scale), (x, head + r * row_h))
    return grid


_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (0, 0, 128), (128, 0, 0)]


def plot_curves(curves: dict[str, list[tuple[int, float]]], hlines: dict[str, float], path: str | Path,
                title: str = "FD-T over training iterations", size: tuple[int, int] = (820, 460)):
    """Draw ``curves`` (name → [(iteration, value)]) and dashed horizontal reference lines with PIL; save a PNG."""
    from PIL import Image, ImageDraw

    w, h = size
    left, right, top, bottom = 60, 250, 30, 40
    img = Image.new("RGB", size, "white")
    dr = ImageDraw.Draw(img)
    xs = [x for c in curves.values() for x, _ in c] or [0, 1]
    ys = [y for c in curves.values() for _, y in c] + list(hlines.values()) or [0, 1]
    x0, x1 = min(xs), max(max(xs), min(xs) + 1)
    y0, y1 = 0.0, max(max(ys) * 1.05, 1e-6)

    def px(x):
        return left + (x - x0) / (x1 - x0) * (w - left - right)

    def py(y):
        return h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom)

    dr.rectangle([left, top, w - right, h - bottom], outline="black")
    for k in range(5):
        yv = y0 + k * (y1 - y0) / 4
        dr.text((5, py(yv) - 6), f"{yv:.0f}", fill="black")
        xv = x0 + k * (x1 - x0) / 4
        dr.text((px(xv) - 10, h - bottom + 5), f"{xv:.0f}", fill="black")
    dr.text((left, 8), title, fill="black")
    dr.text((w - right - 60, h - 15), "iteration", fill="black")
    items = list(curves.items()) + [(k, None) for k in hlines]
    for i, (name, pts) in enumerate(items):
        col = _COLORS[i % len(_COLORS)]
        if pts is None:
            y = py(hlines[name])
            for xx in range(left, w - right, 8):
                dr.line([xx, y, xx + 4, y], fill=col, width=2)
        else:
            pts = sorted(pts)
            if len(pts) > 1:
                dr.line([(px(x), py(y)) for x, y in pts], fill=col, width=2)
            for x, y in pts:
                dr.ellipse([px(x) - 2, py(y) - 2, px(x) + 2, py(y) + 2], fill=col)
        dr.line([w - right + 10, top + 10 + 18 * i, w - right + 30, top + 10 + 18 * i], fill=col, width=3)
        dr.text((w - right + 35, top + 4 + 18 * i), name[:34], fill="black")
    img.save(path)
    return img

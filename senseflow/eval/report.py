"""Results as JSON and as a markdown table laid out like the paper's Table 1, its published rows beside ours.

The published numbers are docs/method.md §19.1 (COCO-5K, 4 steps; FID-T = FID against teacher samples). A cell of our
row is ``–`` when the metric was skipped or failed; the reason is listed under the table. The paper's FID-T rows
of the teachers themselves are ``–`` as published.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from senseflow.eval.metrics import MetricResult

__all__ = ["COLUMNS", "PAPER_TABLE1", "format_value", "markdown_table", "write_report"]

#: (metric key, column header, decimals) in the paper's column order
COLUMNS: tuple[tuple[str, str, int], ...] = (
    ("fid_t", "FID-T", 2), ("patch_fid_t", "Patch FID-T", 2), ("clip", "CLIP", 4), ("hpsv2", "HPSv2", 4),
    ("pickscore", "Pick", 2), ("imagereward", "ImageReward", 4),
)

_N = None
#: docs/method.md §19.1: block → (title, rows of (method, FID-T, Patch FID-T, CLIP, HPSv2, Pick, ImageReward))
PAPER_TABLE1: dict[str, tuple[str, list[tuple]]] = {
    "sdxl": ("SDXL (teacher 80 NFE)", [
        ("SDXL (80 NFE)", _N, _N, 0.3293, 0.2930, 22.67, 0.8719),
        ("LCM-SDXL", 18.47, 30.63, 0.3230, 0.2824, 22.22, 0.5693),
        ("PCM-SDXL", 14.38, 17.77, 0.3242, 0.2920, 22.54, 0.6926),
        ("Flash-SDXL", 17.97, 23.24, 0.3216, 0.2830, 22.17, 0.4295),
        ("SDXL-Lightning", 13.67, 16.57, 0.3214, 0.2931, 22.80, 0.7799),
        ("Hyper-SDXL", 13.71, 17.49, 0.3254, 0.3000, 22.98, 0.9777),
        ("DMD2-SDXL", 15.04, 18.72, 0.3277, 0.2963, 22.98, 0.9324),
        ("Ours-SDXL", 17.76, 21.01, 0.3248, 0.3010, 23.17, 0.9951),
    ]),
    "sd35": ("SD 3.5 (teacher SD 3.5 Large, 100 NFE)", [
        ("SD 3.5 Large (100 NFE)", _N, _N, 0.3310, 0.2993, 22.98, 1.1629),
        ("SD 3.5 Large Turbo", 13.58, 22.88, 0.3262, 0.2909, 22.89, 1.0116),
        ("Ours-SD 3.5", 13.38, 17.48, 0.3286, 0.3016, 23.01, 1.1713),
        ("Ours-SD 3.5 (Euler)", 15.24, 20.26, 0.3287, 0.3008, 22.90, 1.2062),
    ]),
    "flux": ("FLUX (teacher FLUX.1-dev)", [
        ("FLUX.1 dev (50 NFE)", _N, _N, 0.3202, 0.3000, 23.18, 1.1170),
        ("FLUX.1 dev (25 NFE)", _N, _N, 0.3207, 0.2986, 23.14, 1.1063),
        ("FLUX.1-schnell", _N, _N, 0.3264, 0.2962, 22.77, 1.0755),
        ("Hyper-FLUX", 11.24, 23.47, 0.3238, 0.2963, 23.09, 1.0983),
        ("FLUX-Turbo-Alpha", 11.22, 24.52, 0.3218, 0.2907, 22.89, 1.0106),
        ("Ours-FLUX", 15.64, 19.60, 0.3167, 0.2997, 23.13, 1.0921),
        ("Ours-FLUX (Euler)", 16.50, 20.29, 0.3171, 0.3008, 23.26, 1.1424),
    ]),
}


def format_value(value: float | None, decimals: int) -> str:
    return "–" if value is None else f"{value:.{decimals}f}"


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def markdown_table(results: Mapping[str, MetricResult], row_name: str, block: str | None = None,
                   title: str = "COCO-5K, 4 steps", num_prompts: int | None = None) -> str:
    """Table 1's layout: a header, the paper's rows of ``block`` (if any), then our row in bold."""
    lines = [f"## {title}" + (f" — {PAPER_TABLE1[block][0]}" if block else ""), ""]
    lines.append(_row(["method", *[h for _, h, _ in COLUMNS]]))
    lines.append(_row(["---"] * (len(COLUMNS) + 1)))
    if block:
        for method, *vals in PAPER_TABLE1[block][1]:
            lines.append(_row([f"{method} (paper)", *[format_value(v, d) for v, (_, _, d) in zip(vals, COLUMNS)]]))
    ours = []
    for key, _, d in COLUMNS:
        r = results.get(key)
        ours.append(format_value(r.value if r is not None and r.status == "ok" else None, d))
    lines.append(_row([f"**{row_name}**", *ours]))
    notes = [f"- {h}: {results[k].status} — {results[k].message}" for k, h, _ in COLUMNS
             if k in results and results[k].status != "ok"]
    if num_prompts is not None:
        notes.insert(0, f"- our row: {num_prompts} prompts" +
                     ("" if num_prompts == 5000 else " (the paper uses COCO-5K: 5000 prompts; values are not "
                      "directly comparable)"))
    if notes:
        lines += ["", *notes]
    digits = results.get("digits")
    if digits is not None and digits.status == "ok":
        details = digits.details
        lines += ["", "### Digits demo", "", _row(["method", "prompt accuracy", "FD-T", "FD-real"]),
                  _row(["---"] * 4),
                  _row([f"**{row_name}**", format_value(details.get("accuracy"), 4),
                        format_value(details.get("fd_t"), 3), format_value(details.get("fd_real"), 3)])]
    return "\n".join(lines) + "\n"


def write_report(output_dir: Path | str, results: Mapping[str, MetricResult], meta: Mapping[str, Any],
                 row_name: str, block: str | None, title: str, num_prompts: int) -> tuple[Path, Path]:
    """Write ``metrics.json`` (meta + every metric's status, value, message, details) and ``table.md``."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / "metrics.json", out / "table.md"
    payload = {**meta, "metrics": {k: r.to_dict() for k, r in results.items()}}
    js.write_text(json.dumps(payload, indent=1, default=str), encoding="utf-8")
    md.write_text(markdown_table(results, row_name, block, title, num_prompts), encoding="utf-8")
    return js, md

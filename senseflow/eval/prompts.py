"""Prompt sets of an evaluation: a text file, a JSON file, or a COCO captions annotation file.

* ``text``: one prompt per line, blank lines skipped (as the inference scripts read them);
* ``json``: a list of strings, or a list of objects with the prompt under ``key`` (default ``"prompt"``; other
  fields, e.g. ``"digit"``, are kept as metadata), or an object holding such a list under ``"prompts"``;
* ``coco``: a COCO captions file (``captions_val2014.json`` / ``captions_val2017.json``: ``images`` and
  ``annotations`` with ``image_id`` and ``caption``). ``num`` images are drawn without replacement by a
  permutation of the sorted image ids from ``torch.Generator().manual_seed(seed)`` and listed in ascending id order;
  each image contributes one caption: the one with the smallest annotation id (``caption: first``) or one drawn
  with the same generator (``caption: random``). This is the "COCO-5K" set of docs/method.md §19 with ``num = 5000``.

Whitespace inside a prompt is collapsed to single spaces (COCO captions hold newlines and trailing blanks), so the
set can be written one prompt per line (``prompts.txt``, read by the generation code) next to a ``prompts.json``
that records the metadata. For ``text`` and ``json`` a ``num`` smaller than the file keeps the first ``num``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

__all__ = ["PromptSet", "load_prompt_set", "read_prompt_set_file", "SOURCES"]

SOURCES: tuple[str, ...] = ("text", "json", "coco")


@dataclass
class PromptSet:
    """Prompts by index (the PNG of prompt i is ``{i:05d}.png``) with per-prompt metadata."""

    prompts: list[str]
    meta: list[dict[str, Any]] = field(default_factory=list)
    description: str = ""

    def __post_init__(self) -> None:
        if not self.meta:
            self.meta = [{} for _ in self.prompts]
        if len(self.meta) != len(self.prompts):
            raise ValueError(f"PromptSet: {len(self.prompts)} prompts but {len(self.meta)} metadata entries")

    def __len__(self) -> int:
        return len(self.prompts)

    def write(self, folder: Path | str) -> tuple[Path, Path]:
        """Write ``prompts.txt`` (one per line) and ``prompts.json`` (index, prompt, metadata) into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        txt, js = folder / "prompts.txt", folder / "prompts.json"
        txt.write_text("".join(p + "\n" for p in self.prompts), encoding="utf-8")
        rows = [{"index": i, "prompt": p, **m} for i, (p, m) in enumerate(zip(self.prompts, self.meta))]
        js.write_text(json.dumps({"description": self.description, "prompts": rows}, indent=1, ensure_ascii=False),
                      encoding="utf-8")
        return txt, js


def _clean(text: Any, where: str) -> str:
    if not isinstance(text, str):
        raise ValueError(f"{where}: expected a string prompt, got {type(text).__name__}")
    cleaned = " ".join(text.split())
    if not cleaned:
        raise ValueError(f"{where}: empty prompt")
    return cleaned


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None


def _load_text(path: Path) -> PromptSet:
    from senseflow.inference import read_prompts

    prompts = [_clean(p, f"{path}") for p in read_prompts(path)]
    return PromptSet(prompts, description=f"text file {path}")


def _load_json(path: Path, key: str) -> PromptSet:
    data = _read_json(path)
    if isinstance(data, dict):
        if "prompts" not in data:
            raise ValueError(f"{path}: a JSON object must hold a 'prompts' list")
        data = data["prompts"]
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path}: expected a non-empty JSON list of prompts")
    prompts: list[str] = []
    meta: list[Any] = []
    for i, item in enumerate(data):
        if isinstance(item, str):
            prompts.append(_clean(item, f"{path} item {i}"))
            meta.append({})
        elif isinstance(item, dict):
            if key not in item:
                raise ValueError(f"{path} item {i} has no {key!r} key (keys: {sorted(item)})")
            prompts.append(_clean(item[key], f"{path} item {i}"))
            meta.append({k: v for k, v in item.items() if k not in (key, "index")})
        else:
            raise ValueError(f"{path} item {i}: expected a string or an object, got {type(item).__name__}")
    return PromptSet(prompts, meta, description=f"JSON file {path}")


def _load_coco(path: Path, num: int | None, seed: int, caption: str) -> PromptSet:
    if caption not in ("first", "random"):
        raise ValueError(f"prompts.caption must be 'first' or 'random', got {caption!r}")
    data = _read_json(path)
    if not isinstance(data, dict) or "annotations" not in data:
        raise ValueError(f"{path} is not a COCO captions file (no 'annotations' list)")
    by_image: dict[int, list[tuple[int, str]]] = {}
    for k, ann in enumerate(data["annotations"]):
        try:
            by_image.setdefault(int(ann["image_id"]), []).append((int(ann.get("id", k)), ann["caption"]))
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: annotation {k} lacks image_id / caption") from None
    ids = sorted(by_image)
    if not ids:
        raise ValueError(f"{path} holds no captions")
    n = len(ids) if num is None else int(num)
    if not 1 <= n <= len(ids):
        raise ValueError(f"prompts.num = {num} but {path} has captions for {len(ids)} images")
    gen = torch.Generator().manual_seed(int(seed))
    chosen = sorted(ids[i] for i in torch.randperm(len(ids), generator=gen)[:n].tolist())
    files = {int(im["id"]): im.get("file_name") for im in data.get("images", []) if "id" in im}
    prompts, meta = [], []
    for image_id in chosen:
        caps = sorted(by_image[image_id])
        pick = caps[0] if caption == "first" else caps[int(torch.randint(len(caps), (1,), generator=gen))]
        prompts.append(_clean(pick[1], f"{path} annotation {pick[0]}"))
        meta.append({"image_id": image_id, "annotation_id": pick[0], "file_name": files.get(image_id)})
    return PromptSet(prompts, meta, description=f"COCO captions {path}: {n} images, seed {seed}, caption {caption}")


def load_prompt_set(source: str, path: Path | str, num: int | None = None, seed: int = 0, key: str = "prompt",
                    caption: str = "first") -> PromptSet:
    """Load a prompt set (see the module docstring); raises FileNotFoundError / ValueError naming the file."""
    if source not in SOURCES:
        raise ValueError(f"prompts.source must be one of {', '.join(SOURCES)}, got {source!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path} (prompts.path, source {source})")
    if num is not None and int(num) < 1:
        raise ValueError(f"prompts.num must be at least 1 (or null for all), got {num}")
    if source == "coco":
        return _load_coco(path, num, seed, caption)
    ps = _load_text(path) if source == "text" else _load_json(path, key)
    if num is not None and int(num) < len(ps):
        ps = PromptSet(ps.prompts[: int(num)], ps.meta[: int(num)], ps.description + f" (first {int(num)})")
    return ps


def read_prompt_set_file(path: Path | str) -> PromptSet:
    """Read back a ``prompts.json`` written by :meth:`PromptSet.write`."""
    path = Path(path)
    data = _read_json(path)
    rows: Sequence[dict] = data["prompts"]
    return PromptSet([r["prompt"] for r in rows],
                     [{k: v for k, v in r.items() if k not in ("index", "prompt")} for r in rows],
                     data.get("description", ""))

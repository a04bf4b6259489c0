"""Bad-input battery: every malformed file or record is handled as stated, with a message naming file and record.

Each row: how to make the input, what happens when the data set is opened and record 1 is loaded, and what
``senseflow data check`` makes of it.

* outcome ``open``: opening raises ``error`` (structure is broken; the message names the file);
* outcome ``load``: opening works, loading record 1 raises ``BadSampleError`` (training replaces such a sample);
* outcome ``ok``: the record loads as a normal (3, R, R) image / latent sample.

``check`` is the expected (usable?, finding) of :func:`check_dataset`: finding is an issue kind, or
``"structure"`` for a structural failure.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from senseflow.data import BadSampleError, DataError, check_dataset, open_dataset
from test_data_support import fp16_latents, noise_image, write_raw_lmdb

R = 16


def _json(root: Path, obj) -> Path:
    p = root / "set.json"
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return p


def _set_with_image1(root: Path, make_image: Callable[[Path], None], suffix: str = ".png") -> Path:
    """Three records; record 1's image file is written by ``make_image`` (or not at all)."""
    (root / "im").mkdir()
    names = [f"im/a{i}{suffix if i == 1 else '.png'}" for i in range(3)]
    for i in (0, 2):
        noise_image(24, 24, seed=i).save(root / names[i])
    make_image(root / names[1])
    return _json(root, {"keys": ["k0", "k1", "k2"], "image_paths": names, "prompts": ["a", "b", "c"]})


def _good(**over) -> dict:
    d = {"keys": ["k0", "k1"], "image_paths": ["x0.png", "x1.png"], "prompts": ["a", "b"]}
    d.update(over)
    return d


def _truncated_png(p: Path) -> None:
    noise_image(64, 64).save(p.with_suffix(".full.png"))
    data = p.with_suffix(".full.png").read_bytes()
    p.write_bytes(data[: len(data) // 2])


def _i16(p: Path) -> None:
    Image.fromarray(np.full((24, 24), 25700, np.uint16)).save(p)  # 25700 = 257·100 → grey 100


def _cmyk(p: Path) -> None:
    Image.new("CMYK", (24, 24), (0, 255, 255, 0)).save(p, "JPEG", quality=100)


def _jsonl(root: Path, lines: list[bytes]) -> Path:
    noise_image(24, 24).save(root / "a.png")
    p = root / "set.jsonl"
    p.write_bytes(b"\n".join(lines) + b"\n")
    return p


_REC0 = json.dumps({"key": "k0", "image_path": "a.png", "prompt": "a"}).encode()
_LAT = fp16_latents(3)


def _lmdb(root: Path, **kw) -> Path:
    lat = kw.pop("latents", [a.tobytes() for a in _LAT])
    prompts = kw.pop("prompts", [b"a", b"b", b"c"])
    return write_raw_lmdb(root / "lmdb", lat, prompts, **kw)


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[Path], Path]
    outcome: str  # "open" | "load" | "ok"
    error: type[Exception] | None
    message: tuple[str, ...]  # substrings of the error message (file name, record, what was expected)
    check: tuple[bool, str | None]


CASES = [
    Case("unequal list lengths", lambda r: _json(r, _good(prompts=["a"])),
         "open", DataError, ("set.json", "equal length", "'prompts': 1"), (False, "structure")),
    Case("missing key", lambda r: _json(r, {"keys": ["k0"], "image_paths": ["x.png"]}),
         "open", DataError, ("set.json", "missing key(s) ['prompts']"), (False, "structure")),
    Case("list of wrong type", lambda r: _json(r, _good(image_paths="x0.png")),
         "open", DataError, ("set.json", "'image_paths' must be a list, got str"), (False, "structure")),
    Case("item of wrong type", lambda r: _json(r, _good(prompts=["a", 5])),
         "open", DataError, ("set.json", "record 1 (key 'k1')", "prompt must be a string, got int"),
         (False, "structure")),
    Case("top level is a list", lambda r: _json(r, [{"key": "k0"}]),
         "open", DataError, ("set.json", "top level must be an object", "use a .jsonl"), (False, "structure")),
    Case("duplicate key", lambda r: _json(r, _good(keys=["k0", "k0"])),
         "open", DataError, ("set.json", "record 1 (key 'k0')", "duplicate key"), (False, "structure")),
    Case("invalid UTF-8", lambda r: (r / "set.json").write_bytes(b'{"keys": ["\xff"]}') and r / "set.json",
         "open", DataError, ("set.json", "line 1", "invalid UTF-8 at byte 11"), (False, "structure")),
    Case("invalid JSON", lambda r: _json(r, '{"keys": [1, 2,\n ]'),
         "open", DataError, ("set.json", "line 2", "invalid JSON"), (False, "structure")),
    Case("empty file", lambda r: _json(r, ""),
         "open", DataError, ("set.json", "file is empty"), (False, "structure")),
    Case("no records", lambda r: _json(r, {"keys": [], "image_paths": [], "prompts": []}),
         "open", DataError, ("set.json", "no records"), (False, "structure")),
    Case("missing image", lambda r: _set_with_image1(r, lambda p: None),
         "load", BadSampleError, ("set.json", "record 1 (key 'k1')", "a1.png does not exist"),
         (False, "missing_image")),
    Case("truncated PNG", lambda r: _set_with_image1(r, _truncated_png),
         "load", BadSampleError, ("set.json", "record 1 (key 'k1')", "a1.png is unreadable", "truncated"),
         (False, "unreadable_image")),
    Case("not an image", lambda r: _set_with_image1(r, lambda p: p.write_text("hello")),
         "load", BadSampleError, ("set.json", "record 1 (key 'k1')", "unreadable", "UnidentifiedImageError"),
         (False, "unreadable_image")),
    Case("1-pixel image", lambda r: _set_with_image1(r, lambda p: Image.new("RGB", (1, 1), (255, 0, 0)).save(p)),
         "ok", None, (), (True, "small_image")),
    Case("greyscale", lambda r: _set_with_image1(r, lambda p: noise_image(24, 24, mode="L").save(p)),
         "ok", None, (), (True, None)),
    Case("RGBA", lambda r: _set_with_image1(r, lambda p: noise_image(24, 24, mode="RGBA").save(p)),
         "ok", None, (), (True, None)),
    Case("CMYK JPEG", lambda r: _set_with_image1(r, _cmyk, ".jpg"),
         "ok", None, (), (True, None)),
    Case("16-bit greyscale", lambda r: _set_with_image1(r, _i16),
         "ok", None, (), (True, None)),
    Case("extreme aspect ratio", lambda r: _set_with_image1(r, lambda p: noise_image(2000, 20).save(p)),
         "ok", None, (), (True, "extreme_aspect")),
    Case("JSONL record without prompt",
         lambda r: _jsonl(r, [_REC0, json.dumps({"key": "k1", "image_path": "a.png"}).encode()]),
         "load", BadSampleError, ("set.jsonl", "record 1", "line 2", "missing field(s) ['prompt']"),
         (False, "malformed_record")),
    Case("JSONL invalid UTF-8 line",
         lambda r: _jsonl(r, [_REC0, b'{"key": "k1", "image_path": "a.png", "prompt": "\xc3("}']),
         "load", BadSampleError, ("set.jsonl", "record 1", "line 2", "invalid UTF-8"), (False, "malformed_record")),
    Case("JSONL empty file", lambda r: (r / "e.jsonl").write_text("\n \n") and r / "e.jsonl",
         "open", DataError, ("e.jsonl", "file is empty"), (False, "structure")),
    Case("LMDB without latents_shape", lambda r: _lmdb(r, header={"prompts_shape": b"3"}),
         "open", DataError, ("lmdb", "no 'latents_shape' key"), (False, "structure")),
    Case("LMDB counts disagree", lambda r: _lmdb(r, header={"latents_shape": b"3 4 8 8", "prompts_shape": b"2"}),
         "open", DataError, ("lmdb", "'prompts_shape' says 2 prompts but 'latents_shape' says 3"),
         (False, "structure")),
    Case("LMDB latent of wrong byte length",
         lambda r: _lmdb(r, latents=[_LAT[0].tobytes(), b"\0" * 10, _LAT[2].tobytes()]),
         "load", BadSampleError, ("lmdb", "record 1", "latent has 10 bytes, expected 512"), (False, "latent_size")),
    Case("LMDB missing prompt", lambda r: _lmdb(r, prompts=[b"a", None, b"c"]),
         "load", BadSampleError, ("lmdb", "record 1", "missing 'prompts_1_data'"), (False, "missing_prompt")),
    Case("LMDB prompt not UTF-8", lambda r: _lmdb(r, prompts=[b"a", b"\xff\xfe", b"c"]),
         "load", BadSampleError, ("lmdb", "record 1", "not valid UTF-8"), (False, "invalid_prompt")),
    Case("LMDB empty caption", lambda r: _lmdb(r, prompts=[b"a", b"", b"c"]),
         "ok", None, (), (True, "empty_caption")),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, tmp_path: Path):
    path = case.make(tmp_path)
    resolution = 64 if "lmdb" in str(path) else R  # raw LMDB latents are 8×8 → 64 px at 8× VAE downscale

    if case.outcome == "open":
        with pytest.raises(case.error) as exc:
            open_dataset(path, resolution)
    else:
        ds = open_dataset(path, resolution)
        if case.outcome == "load":
            with pytest.raises(case.error) as exc:
                ds.load(1)
            assert exc.value.index == 1
        else:
            s = ds.load(1)
            if "pixels" in s:
                assert s["pixels"].shape == (3, R, R) and s["pixels"].abs().max() <= 1.0
            else:
                assert s["latents"].shape == (4, 8, 8)
    if case.outcome != "ok":
        for part in case.message:
            assert part in str(exc.value), f"{part!r} not in {str(exc.value)!r}"

    report = check_dataset(path, resolution)
    usable, finding = case.check
    assert report.usable is usable, report.summary()
    if finding == "structure":
        assert report.structural and str(path.name) in report.structural
    elif finding is not None:
        hits = [i for i in report.issues if i.kind == finding]
        assert hits and hits[0].index == 1 and path.name in hits[0].message, report.summary()


def test_sixteen_bit_image_keeps_its_grey_level(tmp_path):
    """25700 = 257·100 in an I;16 PNG → 100/127.5 − 1 after loading (PIL alone would give white)."""
    ds = open_dataset(_set_with_image1(tmp_path, _i16), R)
    assert torch.allclose(ds.load(1)["pixels"], torch.full((3, R, R), 100 / 127.5 - 1), atol=1e-6)


def test_check_tolerates_up_to_max_bad(tmp_path):
    path = _set_with_image1(tmp_path, lambda p: None)
    assert not check_dataset(path, R).usable
    assert check_dataset(path, R, max_bad=1).usable

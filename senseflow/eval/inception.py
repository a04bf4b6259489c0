"""Inception-v3 feature network for FID, in plain torch (no torchvision), loaded from a local weights file.

Why our own module: every maintained FID package on PyPI (pytorch-fid, torch-fidelity, clean-fid, and
torchmetrics' FID through torch-fidelity) requires torchvision, which this project cannot install
(docs/evaluation.md: no torchvision wheel works with its CPU torch). The network is small and fully specified,
so it is written here from the Inception-v3 architecture (Szegedy et al., 2016) with the three changes of the
TensorFlow graph that FID was defined on (Heusel et al., 2017):

* the average pools inside the A, C and first E blocks exclude padding from the mean;
* the pooling branch of the last E block (``Mixed_7c``) is a max pool;
* 1008 logits (unused here).

Parameter names follow the widely distributed PyTorch port of that graph (``pt_inception-2015-12-05-*.pth``,
``Conv2d_1a_3x3.conv.weight``, ``Mixed_5b.branch1x1.bn.running_mean``, ...), so that file loads with
``strict=True``. The features are the 2048-d global average of the last block (``pool3``).

Input protocol (pytorch-fid's): uint8 RGB → x ∈ [0, 1] → bilinear resize to 299×299 (``align_corners=False``,
skipped when already 299²) → 2x − 1. ``channel_divisor`` > 1 divides every width (tests build a tiny network of
the same class this way; the real weights have divisor 1).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FIDInceptionV3", "load_fid_inception", "save_fid_inception", "FID_INPUT_SIZE"]

#: the input side of the FID network
FID_INPUT_SIZE = 299
_FORMAT = "senseflow-fid-inception"


class BasicConv2d(nn.Module):
    """conv (no bias) → batch norm (ε = 1e-3) → ReLU."""

    def __init__(self, cin: int, cout: int, kernel_size, stride=1, padding=0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg3(x: Tensor) -> Tensor:
    """3×3 average, stride 1, padding 1, padding excluded from the mean (the FID graph's pooling)."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin: int, pool: int, c) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, c(64), 1)
        self.branch5x5_1 = BasicConv2d(cin, c(48), 1)
        self.branch5x5_2 = BasicConv2d(c(48), c(64), 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, c(64), 1)
        self.branch3x3dbl_2 = BasicConv2d(c(64), c(96), 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(c(96), c(96), 3, padding=1)
        self.branch_pool = BasicConv2d(cin, c(pool), 1)
        self.out_channels = c(64) + c(64) + c(96) + c(pool)

    def forward(self, x: Tensor) -> Tensor:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg3(x))
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):
    def __init__(self, cin: int, c) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, c(384), 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, c(64), 1)
        self.branch3x3dbl_2 = BasicConv2d(c(64), c(96), 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(c(96), c(96), 3, stride=2)
        self.out_channels = c(384) + c(96) + cin

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([b3, bd, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, cin: int, c7: int, c) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, c(192), 1)
        self.branch7x7_1 = BasicConv2d(cin, c(c7), 1)
        self.branch7x7_2 = BasicConv2d(c(c7), c(c7), (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c(c7), c(192), (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c(c7), 1)
        self.branch7x7dbl_2 = BasicConv2d(c(c7), c(c7), (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c(c7), c(c7), (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c(c7), c(c7), (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c(c7), c(192), (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, c(192), 1)
        self.out_channels = 4 * c(192)

    def forward(self, x: Tensor) -> Tensor:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            bd = layer(bd)
        return torch.cat([b1, b7, bd, self.branch_pool(_avg3(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin: int, c) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, c(192), 1)
        self.branch3x3_2 = BasicConv2d(c(192), c(320), 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, c(192), 1)
        self.branch7x7x3_2 = BasicConv2d(c(192), c(192), (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(c(192), c(192), (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(c(192), c(192), 3, stride=2)
        self.out_channels = c(320) + c(192) + cin

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """``max_pool``: the FID graph's last block pools its fourth branch with a max instead of an average."""

    def __init__(self, cin: int, c, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, c(320), 1)
        self.branch3x3_1 = BasicConv2d(cin, c(384), 1)
        self.branch3x3_2a = BasicConv2d(c(384), c(384), (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(c(384), c(384), (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, c(448), 1)
        self.branch3x3dbl_2 = BasicConv2d(c(448), c(384), 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(c(384), c(384), (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(c(384), c(384), (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, c(192), 1)
        self.out_channels = c(320) + 4 * c(384) + c(192)

    def forward(self, x: Tensor) -> Tensor:
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg3(x)
        return torch.cat([b1, b3, bd, self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """The FID Inception-v3; :meth:`features` maps uint8/[0,1] images to the 2048-d pool3 vector (÷ divisor)."""

    def __init__(self, channel_divisor: int = 1, num_classes: int = 1008) -> None:
        super().__init__()
        if channel_divisor < 1:
            raise ValueError(f"channel_divisor must be >= 1, got {channel_divisor}")
        self.channel_divisor = int(channel_divisor)

        def c(n: int) -> int:
            return max(1, n // self.channel_divisor)

        self.Conv2d_1a_3x3 = BasicConv2d(3, c(32), 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(c(32), c(32), 3)
        self.Conv2d_2b_3x3 = BasicConv2d(c(32), c(64), 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(c(64), c(80), 1)
        self.Conv2d_4a_3x3 = BasicConv2d(c(80), c(192), 3)
        self.Mixed_5b = InceptionA(c(192), 32, c)
        self.Mixed_5c = InceptionA(self.Mixed_5b.out_channels, 64, c)
        self.Mixed_5d = InceptionA(self.Mixed_5c.out_channels, 64, c)
        self.Mixed_6a = InceptionB(self.Mixed_5d.out_channels, c)
        self.Mixed_6b = InceptionC(self.Mixed_6a.out_channels, 128, c)
        self.Mixed_6c = InceptionC(self.Mixed_6b.out_channels, 160, c)
        self.Mixed_6d = InceptionC(self.Mixed_6c.out_channels, 160, c)
        self.Mixed_6e = InceptionC(self.Mixed_6d.out_channels, 192, c)
        self.Mixed_7a = InceptionD(self.Mixed_6e.out_channels, c)
        self.Mixed_7b = InceptionE(self.Mixed_7a.out_channels, c, max_pool=False)
        self.Mixed_7c = InceptionE(self.Mixed_7b.out_channels, c, max_pool=True)
        self.feature_dim = self.Mixed_7c.out_channels
        self.fc = nn.Linear(self.feature_dim, num_classes)

    def trunk(self, x: Tensor) -> Tensor:
        """x: (B, 3, 299, 299) in [−1, 1] → pool3 features (B, feature_dim)."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
                     "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            x = getattr(self, name)(x)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        """Images (B, 3, H, W), uint8 in [0, 255] or float in [0, 1] → (B, feature_dim) float32 features."""
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        x = x.to(next(self.parameters()).device)
        if tuple(x.shape[-2:]) != (FID_INPUT_SIZE, FID_INPUT_SIZE):
            x = F.interpolate(x, size=(FID_INPUT_SIZE, FID_INPUT_SIZE), mode="bilinear", align_corners=False)
        return self.trunk(2.0 * x - 1.0)

    def forward(self, images: Tensor) -> Tensor:
        return self.features(images)


def save_fid_inception(model: FIDInceptionV3, path: str | Path) -> Path:
    """Write a safetensors file whose metadata record the format and ``channel_divisor`` (used by tests / demos)."""
    from safetensors.torch import save_file

    from senseflow.core.io import apply_umask

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": _FORMAT, "config": json.dumps({"channel_divisor": model.channel_divisor,
                                                       "num_classes": model.fc.out_features})}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata=meta)
    apply_umask(path)  # safetensors writes 0600; the user's umask decides (senseflow.core.io)
    return path


def _strip_prefix(state: dict[str, Tensor], prefixes: Sequence[str] = ("module.",)) -> dict[str, Tensor]:
    out = {}
    for k, v in state.items():
        for p in prefixes:
            if k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out


def load_fid_inception(path: str | Path, device: torch.device | str = "cpu") -> FIDInceptionV3:
    """Load the FID network from a local file, in eval mode.

    Accepted: the PyTorch port of the FID graph (``pt_inception-2015-12-05-6726825d.pth``, a state dict read with
    ``torch.load(weights_only=True)``) or a safetensors file (written by :func:`save_fid_inception`, or a plain
    conversion of the same state dict). Raises FileNotFoundError / ValueError naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"FID Inception weights not found: {path} (expected pt_inception-2015-12-05-*.pth "
                                "or a .safetensors file; see docs/evaluation.md)")
    config = {"channel_divisor": 1}
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
        if meta.get("format") == _FORMAT:
            config.update(json.loads(meta.get("config", "{}")))
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
    if not isinstance(state, dict) or "fc.weight" not in _strip_prefix(state):
        raise ValueError(f"{path} is not an Inception-v3 state dict (no fc.weight)")
    state = _strip_prefix(state)
    config["num_classes"] = int(state["fc.weight"].shape[0])
    model = FIDInceptionV3(**config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"{path}: not an FID Inception-v3 with channel_divisor {config['channel_divisor']}: "
                         f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected "
                         f"(e.g. {unexpected[:3]})")
    return model.to(device).eval()

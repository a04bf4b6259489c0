"""Loaders (docs/method.md §13.3, fixed): global-rank sharding, per-epoch reshuffle, exact resume, bad-sample
replacement and cap."""
from __future__ import annotations

import logging

import pytest
import torch
from torch.utils.data import Dataset

from senseflow.data import (
    BadSampleError,
    ImageCaptionDataset,
    ResumableDistributedSampler,
    build_dataloader,
    infinite_batches,
)
from test_data_support import write_json_set


class Numbers(Dataset):
    """Sample i = {"i": i, "epoch": e}; indices in ``bad`` raise BadSampleError like a deleted file would."""

    def __init__(self, n: int, bad: frozenset[int] = frozenset()) -> None:
        self.n, self.bad = n, bad

    def __len__(self) -> int:
        return self.n

    def load(self, index: int, epoch: int = 0) -> dict:
        if index in self.bad:
            raise BadSampleError(f"numbers.json, record {index}: image gone", index)
        return {"i": index, "epoch": epoch}


def _loader(ds, rank=0, world=1, bs=2, seed=0, workers=0, drop_last=True, max_bad=100):
    return build_dataloader(ds, bs, workers, False, workers > 0, seed, rank, world, drop_last, max_bad_samples=max_bad)


def _ids(batches) -> list[int]:
    return [int(i) for b in batches for i in b["i"]]


def test_an_epoch_is_split_across_global_ranks_without_overlap():
    """N = 10, W = 3, drop_last: T = 9 positions; global rank r reads π[r::3]; the tail sample is dropped."""
    parts = [list(ResumableDistributedSampler(10, 3, r, seed=1)) for r in range(3)]
    idx = [i for p in parts for _, i in p]
    assert [len(p) for p in parts] == [3, 3, 3] and len(set(idx)) == 9
    perm = ResumableDistributedSampler(10, 3, 0, seed=1).order(0).tolist()
    assert [i for _, i in parts[2]] == perm[2::3]


def test_padding_without_drop_last_covers_everything():
    parts = [[i for _, i in ResumableDistributedSampler(10, 4, r, drop_last=False)] for r in range(4)]
    assert all(len(p) == 3 for p in parts) and set(sum(parts, [])) == set(range(10))


def test_order_is_deterministic_per_seed_and_epoch_and_reshuffled_each_epoch():
    s = ResumableDistributedSampler(50, seed=7)
    assert torch.equal(s.order(3), ResumableDistributedSampler(50, seed=7).order(3))
    assert not torch.equal(s.order(0), s.order(1))
    assert not torch.equal(s.order(0), ResumableDistributedSampler(50, seed=8).order(0))
    assert sorted(s.order(1).tolist()) == list(range(50))


def test_rank_must_be_global():
    with pytest.raises(ValueError, match="rank < world_size"):
        ResumableDistributedSampler(100, world_size=8, rank=8)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_neither_repeats_nor_skips(workers):
    ds = Numbers(11)
    ref = _loader(ds, workers=workers)
    full = [_ids(list(ref)), _ids(list(ref))]  # two whole epochs, uninterrupted

    a = _loader(ds, workers=workers)
    it = iter(a)
    first = [next(it) for _ in range(3)]
    state = a.state_dict()
    assert state["epoch"] == 0 and state["position"] == 6

    b = _loader(ds, workers=workers)
    b.load_state_dict(state)
    rest = list(b)
    assert _ids(first) + _ids(rest) == full[0] and len(full[0]) == 10
    assert _ids(list(b)) == full[1] and b.epoch == 2


def test_resume_with_a_different_world_size():
    """Two ranks consume 2 batches of 2 (global position 8); one rank then reads the rest of the epoch."""
    ds = Numbers(16)
    seen = []
    for r in range(2):
        ld = _loader(ds, rank=r, world=2)
        it = iter(ld)
        seen += _ids([next(it), next(it)])
    state = ld.state_dict()
    assert state["position"] == 8
    one = _loader(ds, world=1)
    one.load_state_dict(state)
    rest = _ids(list(one))
    assert sorted(seen + rest) == list(range(16))


def test_state_from_another_data_set_is_refused():
    a = _loader(Numbers(10))
    with pytest.raises(ValueError, match="num_samples=10 but this run has 12"):
        _loader(Numbers(12)).load_state_dict(a.state_dict())


def test_infinite_batches_advance_and_reshuffle_epochs():
    ld = _loader(Numbers(6), bs=3)
    stream = infinite_batches(ld)
    epochs = [_ids([next(stream), next(stream)]) for _ in range(3)]
    assert all(sorted(e) == list(range(6)) for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1
    assert ld.state_dict()["epoch"] == 2 and ld.state_dict()["position"] == 6
    with pytest.raises(ValueError, match="fewer than batch_size"):
        next(infinite_batches(_loader(Numbers(3), bs=4)))


def test_bad_sample_is_logged_and_replaced_deterministically(caplog):
    ds = Numbers(20, bad=frozenset({5}))
    with caplog.at_level(logging.WARNING, logger="senseflow.data.loader"):
        a = _ids(list(_loader(ds, bs=4)))
    b = _ids(list(_loader(ds, bs=4)))
    assert a == b and 5 not in a and len(a) == 20
    assert "numbers.json, record 5: image gone" in caplog.text and "replaced by sample" in caplog.text


def test_too_many_bad_samples_stop_training_with_a_clear_message():
    ds = Numbers(20, bad=frozenset(range(0, 20, 2)))
    with pytest.raises(RuntimeError, match=r"max_bad_samples=3.*senseflow data check"):
        list(_loader(ds, bs=4, max_bad=3))


def test_image_deleted_during_training_is_replaced(tmp_path, caplog):
    path = write_json_set(tmp_path, n=6, size=(16, 16))
    ld = _loader(ImageCaptionDataset(path, 16), bs=3)
    (tmp_path / "images" / "img_0004.png").unlink()
    with caplog.at_level(logging.WARNING):
        keys = [k for b in ld for k in b["key"]]
    assert len(keys) == 6 and "00000004" not in keys
    assert "set.json, record 4 (key '00000004')" in caplog.text and "img_0004.png does not exist" in caplog.text
    assert ld.state_dict()["bad_indices"] == [4]


def test_build_training_data_from_the_config_section(tmp_path):
    """The trainer's entry: quick check, open by kind, endless stream, resumable state (OmegaConf section)."""
    from omegaconf import OmegaConf

    from senseflow.data import build_training_data

    path = write_json_set(tmp_path, n=5, size=(16, 16))
    cfg = OmegaConf.create({"path": str(path), "kind": "auto", "resolution": 16, "crop": "center", "num_workers": 0,
                            "pin_memory": False, "persistent_workers": False, "max_bad_samples": 2})
    data = build_training_data(cfg, batch_size=2, seed=0, rank=0, world_size=1)
    first = [data.next() for _ in range(3)]  # 2 batches per epoch: the third starts epoch 1
    assert first[0]["pixels"].shape == (2, 3, 16, 16) and first[0]["original_size"].shape == (2, 2)
    assert "_bad_indices" not in first[0]
    state = data.state_dict()
    assert state["epoch"] == 1 and state["position"] == 2
    expected = data.next()["key"]
    again = build_training_data(cfg, batch_size=2, seed=0, rank=0, world_size=1)
    again.load_state_dict(state)
    assert again.next()["key"] == expected

    (tmp_path / "images" / "img_0004.png").unlink()
    with pytest.raises(ValueError, match=r"record 4 \(key '00000004'\)"):
        build_training_data(cfg, batch_size=2, seed=0, rank=0, world_size=1)

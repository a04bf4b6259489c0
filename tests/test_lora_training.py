"""LoRA players on one shared frozen base (docs/method.md §3.8, §7.1): what trains, what the teacher sees, IDA on the
adapters, checkpoints and a kill -9 resume, and the config's refusals.

The runs use the tiny SD3.5-Medium trainer (``configs/tiny/sd35_senseflow.yaml``) with G and F as rank-4 adapters.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dist_runs import build_assets, config_path, dcp_contents, differing, flatten, tail, torchrun, train_args
from senseflow.config import load_config
from senseflow.config.errors import ConfigError
from senseflow.method.adapters import AdapterSpec, SharedBase, ida_on_adapters
from senseflow.method.lora_mix import mix_lora

TRAINER = "sd35_senseflow"
RANK = 4
LORA = (f"model.lora.student.rank={RANK}", f"model.lora.fake.rank={RANK}")
GD, ITERATIONS, SAVE_EVERY = 2, 6, 2
RUN = (f"method.gd={GD}", f"train.iterations={ITERATIONS}", f"train.save_interval={SAVE_EVERY}",
       "train.keep_last=0", "train.ema.enabled=true", "train.ema.warmup=10", "optimizer.lr_generator=1e-3",
       "optimizer.lr_fake=1e-3", "optimizer.lr_start=1e-3", "optimizer.warmup_steps=0")


@pytest.fixture(scope="session")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_assets(tmp_path_factory.getbasetemp() / "dist_assets", kinds=("sd35-medium",))


def overrides(assets: Path, *extra: str) -> list[str]:
    return [f"teacher.path={assets / 'sd35-medium'}", f"data.path={assets / 'data' / 'dataset.json'}",
            f"discriminator.dino_path={assets / 'backbones' / 'dinov2'}",
            f"discriminator.clip_path={assets / 'backbones' / 'clip_text'}", *extra]


def teacher_net(assets: Path) -> torch.nn.Module:
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel.from_pretrained(str(assets / "sd35-medium"), subfolder="transformer",
                                                 dtype=torch.float32).eval()


def net_inputs(net: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    c, g = net.config, torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(2, c.in_channels, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(2, 5, c.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(2, c.pooled_projection_dim, generator=g),
                timestep=torch.tensor([500.0, 250.0]))


def run_call(net, inputs) -> torch.Tensor:
    with torch.no_grad():
        return net(**inputs, return_dict=False)[0]


@pytest.fixture(scope="module")
def trained(assets: Path, tmp_path_factory: pytest.TempPathFactory):
    """A single-process LoRA run of ITERATIONS iterations, with the base as it was before training."""
    from senseflow.trainer import get_trainer

    run = tmp_path_factory.mktemp("lora") / "run"
    cfg = load_config(config_path(TRAINER), overrides(assets, *LORA, *RUN))
    trainer = get_trainer(TRAINER)(cfg, run)
    trainer.setup()
    shared = trainer.shared
    before_base = {k: v.clone() for k, v in shared.base.state_dict().items() if ".lora_" not in k}
    before_adapters = {k: {n: p.detach().clone() for n, p in w.named_parameters()} for k, w in shared.weights.items()}
    optimised = {p.name: {id(q) for g in p.optimizer.param_groups for q in g["params"]} for p in trainer.players}
    trainer.train()
    return trainer, run, before_base, before_adapters, optimised


def test_only_the_adapters_train_and_the_shared_base_stays_bit_identical(trained):
    trainer, run, before_base, before_adapters, optimised = trained
    shared = trainer.shared
    # G, F and the teacher are one network: the generator and fake views run the same base
    assert trainer.generator_net is shared.base and trainer.teacher.parameters().__next__() is next(
        shared.base.parameters())
    lora = {id(p) for n, p in shared.base.named_parameters() if ".lora_" in n}
    for key, player in (("student", "generator"), ("fake", "fake")):
        adapter = {id(p) for p in shared.weights[key].parameters()}
        assert optimised[player] == adapter and adapter <= lora  # the optimiser holds this adapter only
        moved = [n for n, p in shared.weights[key].named_parameters() if not torch.equal(p, before_adapters[key][n])]
        assert moved, f"the {key} adapter did not train"
    after = {k: v for k, v in shared.base.state_dict().items() if ".lora_" not in k}
    assert after.keys() == before_base.keys()
    assert [k for k in after if not torch.equal(after[k], before_base[k])] == []


def test_checkpoints_hold_the_adapters_and_the_merged_student(trained, assets, tmp_path):
    trainer, run, *_ = trained
    ckpt = run / "checkpoints" / f"iter_{ITERATIONS:06d}"
    contents = dcp_contents(ckpt, tmp_path)
    for part in ("model/generator", "model/fake", "optim/generator", "optim/fake", "extra/ema"):
        keys = [k for k in contents if k.startswith(part + ".")]
        assert keys, part
        if part.startswith("model/"):  # adapter factors only: no base weight of the teacher
            assert all(k.endswith((".A.weight", ".B.weight")) for k in keys), part
            assert len(keys) == 2 * len(trainer.shared.weights["student"].paths)
    adapter = load_file(ckpt / "student_lora.safetensors")
    merged = load_file(ckpt / "student.safetensors")
    net = teacher_net(assets)
    assert merged.keys() == net.state_dict().keys()
    assert len(adapter) == 2 * len(trainer.shared.weights["student"].paths)
    # the merged student is W0 + B·A of the adapter file, and runs as the student view does
    some = next(k for k in adapter if k.endswith(".lora_A.weight")).removesuffix(".lora_A.weight")
    w0 = net.state_dict()[f"{some}.weight"]
    delta = adapter[f"{some}.lora_B.weight"] @ adapter[f"{some}.lora_A.weight"]
    assert torch.count_nonzero(delta) and torch.allclose(merged[f"{some}.weight"], w0 + delta, atol=1e-7)
    net.load_state_dict(merged)
    x = net_inputs(net)
    assert torch.allclose(run_call(net, x), run_call(trainer.generator, x), atol=1e-5)


def test_the_teacher_call_sees_no_adapter(trained, assets):
    trainer, *_ = trained
    pristine = teacher_net(assets)
    x = net_inputs(pristine, seed=1)
    want = run_call(pristine, x)
    assert torch.equal(run_call(trainer.teacher, x), want)
    assert not torch.allclose(run_call(trainer.generator, x), want, atol=1e-6)  # the adapters did train
    with trainer.shared.active("student"):  # a teacher call inside another adapter's block still has none
        assert torch.equal(run_call(trainer.teacher, x), want)
        assert trainer.shared.current == "student"
    assert trainer.shared.current is None


def test_ida_on_adapters_is_mix_lora_layer_by_layer(assets):
    torch.manual_seed(0)
    specs = {k: AdapterSpec(k, RANK, 2.0 * RANK, ("to_q", "to_k", "ff.net.2"), 0.0) for k in ("student", "fake")}
    shared = SharedBase(SharedBase.add_adapters(teacher_net(assets), specs), specs)
    with torch.no_grad():
        for w in shared.weights.values():
            for p in w.parameters():
                p.copy_(torch.randn_like(p))
    fake, gen = shared.weights["fake"], shared.weights["student"]
    before_g = {n: p.clone() for n, p in gen.named_parameters()}
    lam = 0.97
    expected = {key: mix_lora(b_f.detach(), a_f.detach(), b_g.detach(), a_g.detach(), lam)
                for (key, b_f, a_f), (_, b_g, a_g) in zip(fake.factors(), gen.factors())}
    logs = ida_on_adapters(fake, gen, lam)
    for key, b, a in fake.factors():
        assert torch.equal(b, expected[key].b) and torch.equal(a, expected[key].a)
    assert all(torch.equal(p, before_g[n]) for n, p in gen.named_parameters())  # θ is untouched
    # the logged truncation error is the Frobenius-weighted one of the layers' mixes, and is > 0 for a rank-2r mix
    num = sum(m.relative_error ** 2 * float(m.singular_values.square().sum()) for m in expected.values())
    den = sum(float(m.singular_values.square().sum()) for m in expected.values())
    assert logs["ida/lora_truncation"] == pytest.approx((num / den) ** 0.5, rel=1e-9) and num > 0
    assert logs["ida/lora_truncation_max"] == pytest.approx(max(m.relative_error for m in expected.values()))


def test_activation_checkpointing_recomputes_with_the_forwards_adapter(assets):
    """The backward of a checkpointed G forward runs while another adapter (here: none) is active."""
    specs = {"student": AdapterSpec("student", RANK, float(RANK), ("to_q", "to_v", "ff.net.2"), 0.0)}
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        shared = SharedBase(SharedBase.add_adapters(teacher_net(assets), specs), specs)
        with torch.no_grad():
            for p in shared.weights["student"].parameters():
                p.copy_(torch.randn_like(p) * 0.1)
        if checkpointing:
            shared.base.train().enable_gradient_checkpointing(shared.checkpoint_function())
        x = net_inputs(shared.base, seed=2)
        out = shared.view("student")(**x, return_dict=False)[0]
        run_call(shared.view(None), x)  # the teacher runs in between: its state is what the backward finds
        out.square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in shared.weights["student"].named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-7) and grads[0][n].abs().sum() > 0 for n in grads[0])


@pytest.mark.parametrize("extra, key", [
    (("model.lora.student.rank=-1",), "model.lora.student.rank"),
    (("model.lora.fake.dropout=1.5",), "model.lora.fake.dropout"),
    (("model.lora.student.alpha=0",), "model.lora.student.alpha"),
    (("model.lora.student.target_modules=[]",), "model.lora.student.target_modules"),
    (("model.lora.student.rank=4", "model.lora.fake.rank=8"), "model.lora.fake.rank"),
    (("model.lora.student.rank=4",), "model.lora.fake.rank"),  # IDA with one adapter and one full copy
])
def test_a_bad_lora_value_is_one_line_naming_the_key(assets, extra, key):
    with pytest.raises(ConfigError) as err:
        load_config(config_path(TRAINER), overrides(assets, *extra))
    text = str(err.value)
    assert "\n" not in text and text.startswith(key), text


def test_the_cli_refuses_a_bad_lora_value_with_exit_2_before_loading(assets, tmp_path):
    args = train_args(TRAINER, tmp_path / "run", assets, "model.lora.fake.rank=-2")
    proc = subprocess.run([sys.executable, *args], cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, tail(proc)
    lines = [ln for ln in proc.stderr.splitlines() if "model.lora.fake.rank" in ln]
    assert len(lines) == 1 and not (tmp_path / "run").exists()


KILL_ITERATIONS = 4


def launch(run: Path, assets: Path, env: dict[str, str] | None = None):
    args = train_args(TRAINER, run, assets, *LORA, *RUN, f"train.iterations={KILL_ITERATIONS}")
    return torchrun(2, args, cwd=run.parent, env=env)


def test_kill9_then_the_same_command_resumes_bit_identically_with_lora_under_fsdp(assets, tmp_path):
    """Two processes (FSDP2 over gloo): the shared base is sharded once, adapters and their optimiser state are
    DTensor shards; a run SIGKILLed after iteration 3 and started again ends bit-identical to an uninterrupted one."""
    ref, run = tmp_path / "ref" / "run", tmp_path / "kill" / "run"
    ref.parent.mkdir(), run.parent.mkdir()
    proc = launch(ref, assets)
    assert proc.returncode == 0, tail(proc)
    proc = launch(run, assets, {"SENSEFLOW_TEST_KILL_AT": "3"})
    assert proc.returncode != 0
    assert (run / "checkpoints" / "latest").read_text().strip() == "iter_000002"
    proc = launch(run, assets)
    assert proc.returncode == 0, tail(proc)
    assert "at iteration 2" in proc.stdout + proc.stderr
    a, b = (r / "checkpoints" / f"iter_{KILL_ITERATIONS:06d}" for r in (run, ref))
    for name in ("student.safetensors", "student_lora.safetensors", "student_ema.safetensors",
                 "student_ema_lora.safetensors"):
        sa, sb = load_file(a / name), load_file(b / name)
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), name
    da, db = dcp_contents(a, tmp_path), dcp_contents(b, tmp_path)
    assert any(k.startswith("model/generator.layers.") for k in da)
    assert not any("base_layer" in k for k in da)  # the base is the teacher: never checkpointed
    assert differing(da, db) == []
    ta, tb = (torch.load(c / "trainer_state.pt", weights_only=True) for c in (a, b))
    assert differing(flatten(ta), flatten(tb)) == []
    rows = [[{k: v for k, v in json.loads(line).items() if not k.startswith("time/")}
             for line in (r / "metrics.jsonl").read_text().splitlines()] for r in (run, ref)]
    assert rows[0] == rows[1] and any("ida/lora_truncation" in r for r in rows[0])


def test_export_lora_rank_of_a_lora_run_writes_its_adapter_exactly(trained, assets, tmp_path):
    """``senseflow export --lora-rank R`` of a LoRA-trained checkpoint takes the run's adapter (no SVD); the stock
    pipeline with it loaded runs as the merged student does."""
    from diffusers import StableDiffusion3Pipeline

    from senseflow.export import export

    trainer, run, *_ = trained
    ckpt = run / "checkpoints" / f"iter_{ITERATIONS:06d}"
    with pytest.raises(ValueError, match=f"--lora-rank {RANK + 1}: .*rank {RANK}"):
        export(assets / "sd35-medium", ckpt, "sd3", tmp_path / "wrong", lora_rank=RANK + 1)
    assert not (tmp_path / "wrong").exists()
    out = export(assets / "sd35-medium", ckpt, "sd3", tmp_path / "lora", lora_rank=RANK)
    report = json.loads((out / "lora_report.json").read_text())
    assert report["overall"]["relative_error"] == 0.0 and report["counts"]["dropped"] == 0
    merged = teacher_net(assets)
    merged.load_state_dict(load_file(ckpt / "student_ema.safetensors"))  # the export's source: the EMA student
    pipe = StableDiffusion3Pipeline.from_pretrained(str(assets / "sd35-medium"), dtype=torch.float32)
    pipe.load_lora_weights(str(out))
    x = net_inputs(merged, seed=3)
    assert torch.allclose(run_call(pipe.transformer, x), run_call(merged, x), atol=1e-5)

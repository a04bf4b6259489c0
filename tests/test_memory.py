"""The memory plan (``senseflow memory``): shipped architectures, exact byte counts, activation tracing, the CLI.

The plan's numbers are checked against real tensors: parameter and AdamW-state bytes of a tiny FLUX transformer
after one optimiser step, and the activation bytes autograd keeps (with and without checkpointing) against what
the CPU allocator holds after a real forward (torch.profiler's memory accounting).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from senseflow.config import load_config
from senseflow.memory import (
    GIB,
    analytic_head_params,
    build_meta,
    load_arch_config,
    main_memory,
    optimizer_state_bytes,
    param_shapes,
    plan_memory,
    shard_numel,
    tensor_bytes,
    trace_activations,
)

REPO = Path(__file__).resolve().parents[1]
FLUX_PRESET = REPO / "configs" / "FLUX" / "flux_senseflow.yaml"
SD35L_PRESET = REPO / "configs" / "SD35" / "sd35_large_senseflow.yaml"

TINY_FLUX = dict(_class_name="FluxTransformer2DModel", patch_size=1, in_channels=64, num_layers=1,
                 num_single_layers=2, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                 pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=[4, 6, 6])
FLUX_UNITS = ("FluxTransformerBlock", "FluxSingleTransformerBlock")


def storage_bytes(tensors) -> int:
    return sum(t.untyped_storage().nbytes() for t in tensors)


# ---------------------------------------------------------------------------------------------- architectures
# exact counts of the shipped public configs; public figures: SDXL UNet 2.567 B, SD3.5 Medium 2.24-2.5 B (2.5 B
# with the positional table), SD3.5 Large 8.1 B, FLUX.1-dev 11.9 B, DINOv2-L 304 M, T5-XXL encoder 4.76 B,
# CLIP-L text 123 M, OpenCLIP bigG text 695 M, SD/SDXL VAEs 83.7 M.
PUBLIC_COUNTS = {
    "sdxl_unet": 2_567_463_684,
    "sd35_medium_transformer": 2_243_171_520,
    "sd35_large_transformer": 8_056_627_520,
    "flux_dev_transformer": 11_901_408_320,
    "dinov2_large": 304_368_640,
    "t5_v1_1_xxl_encoder": 4_762_310_656,
    "clip_vit_l14_text": 123_060_480,
    "clip_vit_l14_text_with_projection": 123_650_304,
    "clip_bigg14_text_with_projection": 694_659_840,
    "sdxl_vae": 83_653_863,
    "sd3_vae": 83_819_683,
    "flux_vae": 83_819_683,
}


def test_shipped_architectures_build_on_meta_with_the_public_parameter_counts():
    for name, expected in PUBLIC_COUNTS.items():
        net = build_meta(load_arch_config(name))
        assert all(p.is_meta for p in net.parameters()), name
        assert sum(p.numel() for p in net.parameters()) == expected, name


def test_discriminator_head_count_matches_the_method_and_the_real_module():
    from senseflow.models.discriminator import DiscriminatorHead

    # docs/method.md §9.1: ≈96.7 M trainable parameters per head at c = 1024, ≈773 M for the 8 heads
    assert analytic_head_params(1024, 768, 64, 3) == 96_673_984
    assert 8 * analytic_head_params(1024, 768, 64, 3) == pytest.approx(773e6, rel=1e-3)
    small = DiscriminatorHead(channels=32, c_dim=16, cmap_dim=8, downsample=3, virtual_batch=8)
    assert sum(p.numel() for p in small.parameters()) == analytic_head_params(32, 16, 8, 3)


# ---------------------------------------------------------------------------------------------- exact bytes
def test_fsdp_shard_is_the_largest_dim0_chunk():
    for shape, shards in [((3072, 3072), 8), ((7, 5), 4), ((1,), 8), ((64,), 3)]:
        largest = max(c.numel() for c in torch.empty(shape).chunk(shards, dim=0))
        assert shard_numel(shape, shards) == largest


def test_8bit_adamw_state_formula():
    # n ≥ 4096: two uint8 states + two fp32 absmax per 256-block + two 256-entry fp32 maps; smaller: two fp32 states
    n = 10_000
    assert optimizer_state_bytes([(n,)], "adamw8bit") == 2 * n + 2 * 4 * math.ceil(n / 256) + 2 * 1024
    assert optimizer_state_bytes([(100,)], "adamw8bit") == 8 * 100
    assert optimizer_state_bytes([(n,)], "adamw") == 8 * n + 4


def test_parameter_and_adamw_state_bytes_equal_real_tensors_after_one_step():
    torch.manual_seed(0)
    config = {k: v for k, v in TINY_FLUX.items() if k != "_class_name"}
    real = build_meta(dict(TINY_FLUX), device="cpu")
    assert not any(p.is_meta for p in real.parameters())
    opt = torch.optim.AdamW(real.parameters(), lr=1e-3)
    sum(p.float().pow(2).sum() for p in real.parameters()).backward()
    opt.step()
    states = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    shapes = param_shapes(build_meta(dict(TINY_FLUX)))
    assert tensor_bytes(shapes, 4) == storage_bytes(real.parameters())
    assert optimizer_state_bytes(shapes, "adamw") == storage_bytes(states)
    assert config["guidance_embeds"]  # the teacher variant; the plan's student drops the guidance embedder


@pytest.fixture(scope="module")
def tiny_flux_plan(tmp_path_factory):
    """The FLUX preset at 64 px on one GPU with a tiny teacher architecture given as a config.json."""
    folder = tmp_path_factory.mktemp("tiny_flux")
    (folder / "config.json").write_text(json.dumps(TINY_FLUX))
    cfg = load_config(FLUX_PRESET, ["teacher.resolution=64", "data.resolution=64", "teacher.t5_max_length=16"])
    return folder, cfg, plan_memory(cfg, 1, denoiser=str(folder), optimizer="adamw", scenarios=False)


def test_plan_rows_agree_with_real_tiny_models(tiny_flux_plan):
    _, _, plan = tiny_flux_plan
    rows = {r.key: r for r in plan.networks}
    student = build_meta(dict(TINY_FLUX, guidance_embeds=False), device="cpu")  # G and F: no guidance embedder
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    sum(p.pow(2).sum() for p in student.parameters()).backward()
    opt.step()
    real_params = storage_bytes(student.parameters())
    real_states = storage_bytes(t for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    for key in ("generator", "fake"):
        assert rows[key].param_bytes == real_params
        assert rows[key].grad_bytes == storage_bytes(p.grad for p in student.parameters())
        assert rows[key].optim_bytes == pytest.approx(real_states, rel=0.05)  # the plan leaves out host `step`
    teacher = build_meta(dict(TINY_FLUX), device="cpu").to(torch.bfloat16)
    assert rows["teacher"].param_bytes == storage_bytes(teacher.parameters())
    assert rows["teacher"].grad_bytes == rows["teacher"].optim_bytes == 0


def test_sharding_divides_trained_and_teacher_bytes_and_offload_moves_them_to_the_host(tiny_flux_plan):
    _, cfg, one = tiny_flux_plan
    folder = tiny_flux_plan[0]
    eight = plan_memory(cfg, 4, nodes=2, denoiser=str(folder), optimizer="adamw", scenarios=False)
    off = plan_memory(cfg, 4, nodes=2, denoiser=str(folder), optimizer="adamw", cpu_offload=True, scenarios=False)
    r1, r8, ro = ({r.key: r for r in p.networks} for p in (one, eight, off))
    assert eight.shard_degree == 8
    for key in ("generator", "teacher"):
        assert r8[key].param_bytes == pytest.approx(r1[key].param_bytes / 8, rel=0.05)
        assert ro[key].param_bytes == 0
        assert ro[key].host_bytes == r8[key].param_bytes + r8[key].grad_bytes + r8[key].optim_bytes
    assert r8["disc_heads"].param_bytes == r1["disc_heads"].param_bytes  # replicated (DDP)
    assert r8["text:text_encoder_2"].param_bytes == r1["text:text_encoder_2"].param_bytes
    assert off.host_bytes_per_node == 4 * sum(r.host_bytes for r in off.networks)


# ---------------------------------------------------------------------------------------------- activations
def _tiny_inputs(device: str, batch: int = 2, tokens: int = 256, text: int = 32) -> dict:
    g = torch.Generator().manual_seed(0)
    make = lambda *shape: torch.randn(*shape, generator=g).to(device)  # noqa: E731
    return dict(hidden_states=make(batch, tokens, 64).requires_grad_(True), encoder_hidden_states=make(batch, text, 32),
                pooled_projections=make(batch, 32), timestep=torch.ones(batch, device=device),
                img_ids=torch.zeros(tokens, 3, device=device), txt_ids=torch.zeros(text, 3, device=device))


def _allocated_by_forward(model) -> int:
    """Bytes the CPU allocator still holds after making the inputs and running the forward (allocations minus
    frees of every op), less the output."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = model(**_tiny_inputs("cpu"), return_dict=False)[0]
    held = sum(e.self_cpu_memory_usage for e in prof.events())
    return held - out.untyped_storage().nbytes()


def test_traced_activations_on_meta_match_what_a_real_forward_keeps():
    torch.manual_seed(0)
    real = build_meta(dict(TINY_FLUX, guidance_embeds=False), device="cpu").train()
    meta = build_meta(dict(TINY_FLUX, guidance_embeds=False))
    inputs = _tiny_inputs("cpu")
    traced = trace_activations(real, lambda m: m(**inputs, return_dict=False)[0], FLUX_UNITS)
    meta_inputs = _tiny_inputs("meta")
    assert trace_activations(meta, lambda m: m(**meta_inputs, return_dict=False)[0], FLUX_UNITS) == traced
    assert traced.num_units == 3
    # no checkpointing: everything autograd saved is held after the forward
    assert _allocated_by_forward(real) == pytest.approx(traced.total, rel=0.05)
    # checkpointing: only the saved tensors outside the blocks and the blocks' inputs are held after the forward;
    # one block is recomputed at a time in backward (the max_unit term of A_ckpt)
    real.enable_gradient_checkpointing()
    held = _allocated_by_forward(real)
    assert held == pytest.approx(traced.outside + traced.unit_inputs, rel=0.05)
    assert traced.saved(True) == traced.outside + traced.unit_inputs + traced.max_unit < traced.saved(False)


# ---------------------------------------------------------------------------------------------- the command
@pytest.mark.parametrize("preset", [FLUX_PRESET, SD35L_PRESET], ids=["flux", "sd35_large"])
def test_cli_prints_the_table_for_the_presets_on_8_gpus(preset, capsys):
    assert main_memory(["--config", str(preset), "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    for text in ("generator G", "fake score F", "teacher T", "T5-XXL encoder", "D backbone DINOv2", "D heads ×8",
                 "FSDP full shard over 8", "VAE decode (grad)", "peak per GPU", "scenarios"):
        assert text in out, text
    assert ("FITS" in out) or ("DOES NOT FIT" in out)


def test_cli_json_on_two_nodes_with_hybrid_sharding(tiny_flux_plan, capsys):
    folder, _, _ = tiny_flux_plan
    argv = ["--config", str(FLUX_PRESET), "--gpus", "4", "--nodes", "2", "--gpu-gib", "40", "--json",
            "--denoiser", str(folder), "teacher.resolution=64", "data.resolution=64", "dist.hsdp=true"]
    assert main_memory(argv) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["world_size"] == 8 and plan["shard_degree"] == 4  # HSDP: shard inside a node
    assert len(plan["scenarios"]) == 8
    assert plan["peak_bytes"] == plan["static_bytes"] + plan["phases"][plan["peak_phase"]]
    assert plan["usable_bytes"] == int((40 * 0.9 - 1.5) * GIB)
    assert plan["fits"] is True


@pytest.mark.parametrize("argv, message", [
    (["--config", str(FLUX_PRESET), "--gpus", "0"], "--gpus"),
    (["--config", "configs/does_not_exist.yaml", "--gpus", "8"], "does_not_exist.yaml"),
    (["--gpus", "8"], "--config"),
    (["--config", str(FLUX_PRESET), "--gpus", "eight"], "--gpus"),
    (["--config", str(FLUX_PRESET), "--gpus", "8", "method.gdd=5"], "method.gdd"),
    (["--config", str(FLUX_PRESET), "--gpus", "1", "--denoiser-set", "guidance=false"], "--denoiser-set guidance"),
    (["--config", str(FLUX_PRESET), "--gpus", "1", "--denoiser-set", "guidance_embeds"], "KEY=VALUE"),
    (["--config", str(FLUX_PRESET), "--gpus", "1", "--max-batch", "--batch-limit", "0"], "--batch-limit"),
])
def test_bad_arguments_exit_2_with_one_line(argv, message, capsys):
    assert main_memory(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:") and message in err


@pytest.mark.parametrize("hook_patch", [True, False])
def test_plan_counts_the_discriminator_the_trainer_builds(hook_patch, tiny_flux_plan, tmp_path):
    """The plan builds D through the trainer's constructor path (VFMDiscriminator.from_config): hook_patch (one head
    fewer when false) and kernel_size reach it, so its head count equals the trainer's real discriminator."""
    from senseflow.method.distillation import build_discriminator
    from senseflow.tiny import build_tiny_discriminator_backbones

    folder, _, _ = tiny_flux_plan
    bb = build_tiny_discriminator_backbones(tmp_path / "backbones")
    cfg = load_config(FLUX_PRESET, [
        "teacher.resolution=64", "data.resolution=64", "teacher.t5_max_length=16",
        f"discriminator.dino_path={bb['dino']}", f"discriminator.clip_path={bb['clip']}", "discriminator.hooks=[1,3]",
        f"discriminator.hook_patch={str(hook_patch).lower()}", "discriminator.kernel_size=5",
    ])
    plan = plan_memory(cfg, 1, denoiser=str(folder), optimizer="adamw", scenarios=False)
    row = {r.key: r for r in plan.networks}["disc_heads"]
    _, real = build_discriminator(cfg, torch.device("cpu"))  # what the trainer's method builds
    assert len(real.heads) == 2 + int(hook_patch) and row.label == f"D heads ×{len(real.heads)}"
    assert row.params == row.trainable == sum(p.numel() for p in real.trainable_parameters())
    assert row.params == len(real.heads) * analytic_head_params(32, real.heads[0].cmapper.weight.shape[1], 64, 3, 5)


# ---------------------------------------------------------------------------------------------- LoRA players
LORA_RANK = 4
TINY_FLUX_DEDISTILLED = dict(TINY_FLUX, guidance_embeds=False)  # adapters live on the teacher's own network


def lora_linear_params(net: torch.nn.Module, targets: tuple[str, ...], rank: int) -> int:
    """Σ r·(in + out) over the Linear layers whose module path ends with a target pattern (peft's matching),
    counted from the real layers independently of peft."""
    return sum(rank * (m.in_features + m.out_features) for name, m in net.named_modules()
               if isinstance(m, torch.nn.Linear) and any(name == t or name.endswith(f".{t}") for t in targets))


def test_lora_rows_equal_a_tiny_trainers_measured_tensors(tmp_path_factory):
    """The tiny SD3.5-Medium trainer with G and F as rank-4 adapters, 32-bit AdamW and the EMA: after one optimiser
    step of each adapter, the plan's rows equal the storage of the base, of each adapter, its gradient, its AdamW
    state (less the host ``step`` scalars) and of the EMA shadow."""
    from dist_runs import build_assets, config_path
    from senseflow.trainer import get_trainer

    assets = build_assets(tmp_path_factory.getbasetemp() / "dist_assets", kinds=("sd35-medium",))
    cfg = load_config(config_path("sd35_senseflow"), [
        f"teacher.path={assets / 'sd35-medium'}", f"data.path={assets / 'data' / 'dataset.json'}",
        f"discriminator.dino_path={assets / 'backbones' / 'dinov2'}",
        f"discriminator.clip_path={assets / 'backbones' / 'clip_text'}",
        f"model.lora.student.rank={LORA_RANK}", f"model.lora.fake.rank={LORA_RANK}", "optimizer.name=adamw",
        "train.ema.enabled=true"])
    trainer = get_trainer("sd35_senseflow")(cfg, tmp_path_factory.mktemp("lora_mem") / "run")
    trainer.setup()
    shared, players = trainer.method.shared, {p.name: p for p in trainer.players}
    for key, name in (("student", "generator"), ("fake", "fake")):
        weights = shared.weights[key]
        assert {id(p) for p in weights.parameters()} == {id(q) for g in players[name].optimizer.param_groups
                                                          for q in g["params"]}  # the adapter alone is optimised
        sum(p.float().pow(2).sum() for p in weights.parameters()).backward()
        players[name].optimizer.step()
    plan = plan_memory(cfg, 1, scenarios=False)  # the teacher folder's own config.json
    rows = {r.key: r for r in plan.networks}
    for key, name in (("student", "generator"), ("fake", "fake")):
        weights, row = shared.weights[key], rows[name]
        state = [t for p in weights.parameters() for t in players[name].optimizer.state[p].values()
                 if torch.is_tensor(t) and t.dim() > 0]
        assert row.param_bytes == storage_bytes(weights.parameters())
        assert row.grad_bytes == storage_bytes(p.grad for p in weights.parameters())
        assert row.optim_bytes == storage_bytes(state)
    base = [p for n, p in shared.base.named_parameters() if ".lora_" not in n]
    assert rows["teacher"].param_bytes == storage_bytes(base)  # one base, counted once
    assert rows["teacher"].params == sum(p.numel() for p in base)
    assert rows["ema"].param_bytes == storage_bytes(trainer.method.ema.shadow.values())


def test_lora_plan_holds_one_base_and_adapters_of_r_times_in_plus_out(tmp_path):
    """FLUX preset at 64 px on a tiny de-distilled FLUX: with G and F as rank-4 adapters the plan has one frozen
    base and two adapters of Σ r·(in + out) over the family's target Linears; its resident bytes are the full-weight
    plan's less two denoisers' fp32 parameters and AdamW states (plus the adapters'), its peak is lower by at least
    that much, and G's backward holds the adapter's gradients instead of the denoiser's."""
    from senseflow.models.families import get_family

    (tmp_path / "config.json").write_text(json.dumps(TINY_FLUX_DEDISTILLED))
    base = ["teacher.resolution=64", "data.resolution=64", "teacher.t5_max_length=16"]
    lora = [f"model.lora.student.rank={LORA_RANK}", f"model.lora.fake.rank={LORA_RANK}"]
    full = plan_memory(load_config(FLUX_PRESET, base), 1, denoiser=str(tmp_path), optimizer="adamw",
                       scenarios=False)
    plan = plan_memory(load_config(FLUX_PRESET, base + lora), 1, denoiser=str(tmp_path), optimizer="adamw",
                       scenarios=False)
    f_rows, l_rows = ({r.key: r for r in p.networks} for p in (full, plan))
    net = build_meta(dict(TINY_FLUX_DEDISTILLED))
    adapter = lora_linear_params(net, get_family("flux").lora_target_modules, LORA_RANK)
    n = sum(p.numel() for p in net.parameters())
    assert adapter > 0 and [r.key for r in plan.networks].count("teacher") == 1
    for key in ("generator", "fake"):
        assert l_rows[key].params == l_rows[key].trainable == adapter
        assert f_rows[key].params == n
    assert l_rows["teacher"].params == f_rows["teacher"].params == n
    assert l_rows["teacher"].param_bytes == f_rows["teacher"].param_bytes
    denoiser_state = f_rows["generator"].param_bytes + f_rows["generator"].optim_bytes
    adapter_state = l_rows["generator"].param_bytes + l_rows["generator"].optim_bytes
    assert full.static_bytes - plan.static_bytes == 2 * (denoiser_state - adapter_state)
    assert full.peak_bytes - plan.peak_bytes >= full.static_bytes - plan.static_bytes
    g_backward = "G step, G backward"  # G's fp32 gradients: the whole denoiser's, or the adapter's
    assert f_rows["generator"].grad_bytes - l_rows["generator"].grad_bytes == 4 * (n - adapter)
    assert full.phases[g_backward] - plan.phases[g_backward] >= 4 * (n - adapter)


def test_lora_on_flux_dev_is_refused_as_the_trainer_refuses_it_and_a_de_distilled_base_plans(capsys):
    lora = ["model.lora.student.rank=64", "model.lora.fake.rank=64", "teacher.resolution=256", "data.resolution=256"]
    assert main_memory(["--config", str(FLUX_PRESET), "--gpus", "1", *lora]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "guidance_embeds" in err and "model.lora.student.rank" in err
    argv = ["--config", str(FLUX_PRESET), "--gpus", "8", "--gpu-gib", "24", "--denoiser-set", "guidance_embeds=false",
            "--max-batch", "--batch-limit", "4", "--json", *lora]
    assert main_memory(argv) == 0
    out = json.loads(capsys.readouterr().out)
    rows = {r["key"]: r for r in out["networks"]}
    assert rows["generator"]["params"] == 261_689_344  # r·(in + out) over the 419 target Linears of FLUX.1-dev, r = 64
    assert out["denoiser_arch"].endswith("(guidance_embeds=False)")
    assert len(out["max_batches"]) == 8 and all(0 <= s["max_batch"] <= 4 for s in out["max_batches"])

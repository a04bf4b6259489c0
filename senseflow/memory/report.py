"""The memory plan as a readable text table (``senseflow memory`` without ``--json``)."""
from __future__ import annotations

from senseflow.memory.budget import GIB
from senseflow.memory.plan import MemoryPlan


def _gib(n: int) -> str:
    return f"{n / GIB:7.2f}"


def _on(flag: bool) -> str:
    return "on" if flag else "off"


def _count(n: int) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def format_plan(plan: MemoryPlan) -> str:
    """The plan as a readable text table (GiB = 2³⁰ bytes, per GPU)."""
    o = plan.options
    place = f"FSDP full shard over {plan.shard_degree}" if plan.shard_degree > 1 else "no sharding"
    lines = [
        f"SenseFlow memory plan: {plan.config_path}",
        f"teacher family {plan.family} ({plan.denoiser_arch}), {plan.resolution}² px, batch {plan.batch_size}/GPU, "
        f"{plan.world_size} GPUs ({plan.nodes} node{'s' if plan.nodes > 1 else ''} × {plan.gpus_per_node}), {place}",
        f"options: activation checkpointing {'on' if o.checkpointing else 'off'}, optimizer {o.optimizer}, "
        f"CPU offload {'on' if o.cpu_offload else 'off'}",
        f"         VAE decoder checkpointing {_on(o.vae_checkpointing)}, DINOv2 checkpointing "
        f"{_on(o.dino_checkpointing)}, text cache {_on(o.text_cache)}",
        "",
        f"{'network':<22} {'params':>10} {'dtype':>9} {'placement':>14} | {'params':>7} {'buffers':>7} "
        f"{'grads*':>7} {'optim':>7} {'host':>7}   (GiB per GPU)",
        "-" * 109,
    ]
    for r in plan.networks:
        kind = "trained " if r.trainable else "shadow " if r.key == "ema" else "frozen "
        role = kind + (f"/{plan.shard_degree}" if r.sharded else "repl.")
        lines.append(f"{r.label:<22} {_count(r.params):>10} {r.dtype:>9} {role:>14} | {_gib(r.param_bytes)} "
                     f"{_gib(r.buffer_bytes)} {_gib(r.grad_bytes)} {_gib(r.optim_bytes)} {_gib(r.host_bytes)}")
    tot = lambda attr: sum(getattr(r, attr) for r in plan.networks)  # noqa: E731
    lines.append("-" * 109)
    lines.append(f"{'total':<22} {'':>10} {'':>9} {'':>14} | {_gib(tot('param_bytes'))} {_gib(tot('buffer_bytes'))} "
                 f"{_gib(tot('grad_bytes'))} {_gib(tot('optim_bytes'))} {_gib(tot('host_bytes'))}")
    lines.append("* gradients exist only for the player being updated (freed after each step): counted in its phase")
    lines.append("")
    lines.append("activations and working memory (GiB per GPU)")
    for k, v in plan.activations.items():
        lines.append(f"  {k:<43} {_gib(v)}")
    lines.append("")
    static = plan.static_bytes
    lines.append(f"resident: params + buffers + optimiser + batch     {_gib(static)}")
    lines.append("phases: + grads of the player + live activations + working set")
    for k, v in plan.phases.items():
        mark = "  <- peak" if k == plan.peak_phase else ""
        lines.append(f"  + {k:<43} {_gib(v)}  = {_gib(static + v)}{mark}")
    verdict = "FITS" if plan.fits else "DOES NOT FIT"
    lines.append(f"peak per GPU {_gib(plan.peak_bytes).strip()} GiB vs usable {_gib(plan.usable_bytes).strip()} GiB "
                 f"({plan.gpu_gib:g} GiB − {plan.reserve_frac:.0%} fragmentation − {plan.context_gib:g} GiB CUDA "
                 f"context/NCCL): {verdict}")
    if plan.host_bytes_per_node:
        lines.append(f"host memory for offloaded states: {_gib(plan.host_bytes_per_node).strip()} GiB per node")
    if plan.scenarios:
        lines.append("")
        lines.append("scenarios (GiB per GPU)")
        lines.append(f"  {'ckpt':<5} {'optimizer':<10} {'offload':<8} {'resident':>8} {'peak':>8}  {'fits':<5} "
                     f"{'host/node':>9}")
        for s in plan.scenarios:
            lines.append(f"  {'on' if s['checkpointing'] else 'off':<5} {s['optimizer']:<10} "
                         f"{'on' if s['cpu_offload'] else 'off':<8} {_gib(s['static_bytes']):>8} "
                         f"{_gib(s['peak_bytes']):>8}  {'yes' if s['fits'] else 'NO':<5} "
                         f"{_gib(s['host_bytes_per_node']):>9}")
    if plan.max_batches:
        lines.append("")
        lines.append("largest batch per GPU that fits (train.batch_size; peak at that batch, GiB per GPU)")
        lines.append(f"  {'ckpt':<5} {'optimizer':<10} {'offload':<8} {'batch':>5} {'peak':>8}")
        for s in plan.max_batches:
            peak = _gib(s['peak_bytes']) if s['max_batch'] else "      -"
            lines.append(f"  {'on' if s['checkpointing'] else 'off':<5} {s['optimizer']:<10} "
                         f"{'on' if s['cpu_offload'] else 'off':<8} {s['max_batch']:>5} {peak:>8}")
    for note in plan.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)

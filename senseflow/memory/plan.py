"""The plan: phases of one training iteration (which gradients, activations and working sets are live together),
the peak per GPU against the usable memory, the scenarios over the options, and notes on the alternatives."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from senseflow.memory.activations import _Traces
from senseflow.memory.arch import _quiet_diffusers
from senseflow.memory.budget import DTYPE_BYTES, GIB, MemoryPlanError, NetworkMemory
from senseflow.memory.networks import _build_networks, _trace_run


@dataclass
class MemoryOptions:
    """The knobs of one scenario (defaults from the config)."""

    checkpointing: bool
    optimizer: str
    cpu_offload: bool
    vae_checkpointing: bool = False  # train.vae_gradient_checkpointing: the decoder blocks of L_adv's decode
    dino_checkpointing: bool = False  # discriminator.gradient_checkpointing: the DINOv2 layers in the G step
    text_cache: bool = False  # data.text_cache: no text encoder (family's nor D's CLIP) is loaded


@dataclass
class MemoryPlan:
    """Per-GPU bytes of one run under one :class:`MemoryOptions`, plus the other scenarios' totals."""

    config_path: str
    family: str
    denoiser_arch: str
    resolution: int
    batch_size: int
    gpus_per_node: int
    nodes: int
    shard_degree: int
    gpu_gib: float
    reserve_frac: float
    context_gib: float
    options: MemoryOptions
    networks: list[NetworkMemory]
    activations: dict[str, int]  # named activation terms of the chosen options
    phases: dict[str, int]  # phase → transient bytes (grads + activations + working set)
    notes: list[str]
    scenarios: list[dict[str, Any]] = field(default_factory=list)
    max_batches: list[dict[str, Any]] = field(default_factory=list)  # per scenario: the largest batch that fits

    @property
    def world_size(self) -> int:
        return self.gpus_per_node * self.nodes

    @property
    def static_bytes(self) -> int:
        return sum(n.static_bytes for n in self.networks) + self.activations.get("batch tensors", 0)

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.__getitem__)

    @property
    def peak_bytes(self) -> int:
        return self.static_bytes + self.phases[self.peak_phase]

    @property
    def usable_bytes(self) -> int:
        return int((self.gpu_gib * (1.0 - self.reserve_frac) - self.context_gib) * GIB)

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.usable_bytes

    @property
    def host_bytes_per_node(self) -> int:
        return sum(n.host_bytes for n in self.networks) * self.gpus_per_node

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(world_size=self.world_size, static_bytes=self.static_bytes, peak_phase=self.peak_phase,
                 peak_bytes=self.peak_bytes, usable_bytes=self.usable_bytes, fits=self.fits,
                 host_bytes_per_node=self.host_bytes_per_node)
        return d


def _phases(rows: list[NetworkMemory], t: _Traces, opts: MemoryOptions) -> tuple[dict[str, int], dict[str, int]]:
    """(activation terms, phase → grads + live activations + working set), per GPU."""
    checkpointing = opts.checkpointing
    by = {r.key: r for r in rows}

    def fsdp_working(key: str, backward: bool) -> int:  # two gathered units + the root (+ one unit's fp32 grad)
        r = by.get(key)
        if r is None or not r.sharded:
            return 0
        gathered = (2 * r.unit_params + r.root_params) * (2 if t.compute is not None else DTYPE_BYTES[r.dtype])
        return gathered + (r.unit_grad_params * 4 if backward else 0)

    grads = lambda key: by[key].grad_bytes if key in by else 0  # noqa: E731
    a_g = t.denoiser.saved(checkpointing)
    a_g += a_g if "dmd2_head" in by else 0  # the DMD2 classifier's fake-UNet forward with grad
    nograd_gather = max(fsdp_working("teacher", False), fsdp_working("fake", False))
    fsdp_g, fsdp_f = fsdp_working("generator", True), fsdp_working("fake", True)
    # the decode with grad and DINOv2 → pixels: every saved tensor, or with checkpointing the units' inputs plus one
    # recomputed unit (diffusers' decoder blocks; the DINOv2 layers)
    a_vae = t.vae_ckpt.saved(True) if opts.vae_checkpointing else t.vae.total
    a_dino = t.disc_g.saved(True) if opts.dino_checkpointing else t.disc_g.total
    acts = {
        "G forward (grad)": a_g,
        "VAE decode (grad)": a_vae,
        "DINOv2 + heads (grad to pixels)": a_dino,
        "F forward (grad)": a_g,
        "D heads, real + fake branch": 2 * t.disc_d.total,
        "largest unit: denoiser block": t.denoiser.max_unit,
        "largest unit: VAE decoder": t.vae.max_unit,
        "largest unit: DINOv2 layer / D head": max(t.disc_g.max_unit, t.disc_d.max_unit),
        "FSDP gathered units, G/F backward": fsdp_g,
        "FSDP gathered units, no-grad T/F": nograd_gather,
        "batch tensors": t.batch_tensors,
    }
    phases = {
        "G step, no-grad T/F/G forwards (DMD, ISG)": a_g + t.denoiser.max_unit + nograd_gather,
        "G step, VAE + D graph and its backward": a_g + a_vae + a_dino + max(t.vae.max_unit, t.disc_g.max_unit),
        "G step, G backward": grads("generator") + a_g + t.denoiser.max_unit + fsdp_g,
        "F step": grads("fake") + grads("dmd2_head") + a_g + t.denoiser.max_unit + fsdp_f,
        "D step": grads("disc_heads") + 2 * t.disc_d.total + t.disc_d.max_unit,
    }
    return acts, phases


def plan_memory(cfg: Any, gpus_per_node: int, nodes: int = 1, gpu_gib: float = 80.0, *,
                config_path: str = "", denoiser: str | None = None, teacher_sharded: bool = True,
                disc_backbone_dtype: str = "float32", reserve_frac: float = 0.10, context_gib: float = 1.5,
                checkpointing: bool | None = None, optimizer: str | None = None,
                cpu_offload: bool | None = None, scenarios: bool = True,
                denoiser_set: Mapping[str, Any] | None = None, max_batch_limit: int | None = None) -> MemoryPlan:
    """Per-GPU memory of the run that ``cfg`` (a loaded :class:`senseflow.config.SenseFlowConfig`) describes on
    ``gpus_per_node`` × ``nodes`` GPUs of ``gpu_gib`` GiB. ``checkpointing`` / ``optimizer`` / ``cpu_offload``
    default to ``train.gradient_checkpointing`` / ``optimizer.name`` / ``dist.cpu_offload``; with ``scenarios``
    the totals of all 8 combinations are added. ``train.vae_gradient_checkpointing``,
    ``discriminator.gradient_checkpointing`` and ``data.text_cache`` (no text-encoder rows) are read from ``cfg``
    and hold in every scenario. ``denoiser`` picks the teacher architecture (see
    ``--denoiser``; ``denoiser_set`` replaces entries of its config, ``--denoiser-set``); ``teacher_sharded=False``
    replicates T. With ``model.lora.<player>.rank > 0`` that player is an adapter on the one frozen base T (its
    rows count the adapter only). With ``max_batch_limit`` the largest ``train.batch_size`` ≤ that limit that fits
    is searched for every scenario (activations traced at each batch tried; ``MemoryPlan.max_batches``).
    No weights, paths or GPU are needed.
    Raises :class:`MemoryPlanError` on bad arguments."""
    if gpus_per_node < 1 or nodes < 1:
        raise MemoryPlanError(f"--gpus and --nodes must be >= 1 (got {gpus_per_node} and {nodes})")
    if gpu_gib <= 0:
        raise MemoryPlanError(f"--gpu-gib must be > 0 (got {gpu_gib})")
    if not 0 <= reserve_frac < 1 or context_gib < 0:
        raise MemoryPlanError(f"reserve_frac must be in [0, 1) and context_gib >= 0 "
                              f"(got {reserve_frac}, {context_gib})")
    if max_batch_limit is not None and max_batch_limit < 1:
        raise MemoryPlanError(f"--batch-limit must be >= 1 (got {max_batch_limit})")
    with _quiet_diffusers():
        return _plan_memory(cfg, gpus_per_node, nodes, gpu_gib, config_path, denoiser, teacher_sharded,
                            disc_backbone_dtype, reserve_frac, context_gib, checkpointing, optimizer, cpu_offload,
                            scenarios, denoiser_set, max_batch_limit)


def _plan_memory(cfg: Any, gpus_per_node: int, nodes: int, gpu_gib: float, config_path: str, denoiser: str | None,
                 teacher_sharded: bool, disc_backbone_dtype: str, reserve_frac: float, context_gib: float,
                 checkpointing: bool | None, optimizer: str | None, cpu_offload: bool | None,
                 scenarios: bool, denoiser_set: Mapping[str, Any] | None,
                 max_batch_limit: int | None) -> MemoryPlan:
    dtypes = (("teacher.dtype", cfg.teacher.dtype), ("teacher.vae_dtype", cfg.teacher.vae_dtype),
              ("teacher.text_encoder_dtype", cfg.teacher.text_encoder_dtype), ("disc backbone", disc_backbone_dtype))
    for name, dt in dtypes:
        if dt not in DTYPE_BYTES:
            raise MemoryPlanError(f"{name} = {dt!r}: expected one of {', '.join(DTYPE_BYTES)}")
    chosen = MemoryOptions(bool(cfg.train.gradient_checkpointing) if checkpointing is None else checkpointing,
                           cfg.optimizer.name if optimizer is None else optimizer,
                           bool(cfg.dist.cpu_offload) if cpu_offload is None else cpu_offload,
                           vae_checkpointing=bool(cfg.train.vae_gradient_checkpointing),
                           dino_checkpointing=bool(cfg.discriminator.gradient_checkpointing),
                           text_cache=cfg.data.text_cache is not None)
    if chosen.optimizer not in ("adamw", "adamw8bit"):
        raise MemoryPlanError(f"optimizer {chosen.optimizer!r} is not one of adamw, adamw8bit")
    world = gpus_per_node * nodes
    fsdp = world > 1 and cfg.dist.strategy in ("auto", "fsdp")
    shard = (gpus_per_node if cfg.dist.hsdp else world) if fsdp else 1
    arch, student_cfg, nets, disc, notes, shared = _build_networks(cfg, denoiser, fsdp, teacher_sharded,
                                                                   disc_backbone_dtype, denoiser_set)
    batch = int(cfg.train.batch_size)
    cache = {batch: _trace_run(cfg, student_cfg, nets, disc, disc_backbone_dtype, shared)}
    traces = cache[batch]

    def make(opts: MemoryOptions, b: int = batch) -> MemoryPlan:
        if b not in cache:  # the same networks traced at another per-GPU batch
            cache[b] = _trace_run(cfg, student_cfg, nets, disc, disc_backbone_dtype, shared, batch=b)
        rows = [n.row(opts.optimizer, shard, opts.cpu_offload) for n in nets]
        acts, phases = _phases(rows, cache[b], opts)
        return MemoryPlan(config_path, cfg.teacher.family, arch, int(cfg.teacher.resolution), b,
                          gpus_per_node, nodes, shard, float(gpu_gib), reserve_frac, context_gib, opts, rows, acts,
                          phases, list(notes))

    plan = make(chosen)
    plan.notes.extend(_savings_notes(cfg, plan, traces.vae.total - traces.vae_ckpt.saved(True),
                                     traces.disc_g.total - traces.disc_g.saved(True), fsdp and teacher_sharded, shard))
    if not fsdp:
        plan.notes.append(f"no FSDP sharding (world size {world}, dist.strategy={cfg.dist.strategy}): "
                          "trained nets are replicated")
    if cfg.dist.strategy == "ddp" and world > 1:
        plan.notes.append("DDP's gradient buckets hold up to one more copy of the gradients (not counted)")
    if scenarios:
        for ckpt in (True, False):
            for opt in ("adamw8bit", "adamw"):
                for off in (False, True) if fsdp else (False,):
                    p = make(dataclasses.replace(chosen, checkpointing=ckpt, optimizer=opt, cpu_offload=off))
                    plan.scenarios.append(dict(checkpointing=ckpt, optimizer=opt, cpu_offload=off,
                                               static_bytes=p.static_bytes, peak_phase=p.peak_phase,
                                               peak_bytes=p.peak_bytes, fits=p.fits,
                                               host_bytes_per_node=p.host_bytes_per_node))
    if max_batch_limit is not None:
        for ckpt in (True, False):
            for opt in ("adamw8bit", "adamw"):
                for off in (False, True) if fsdp else (False,):
                    opts = dataclasses.replace(chosen, checkpointing=ckpt, optimizer=opt, cpu_offload=off)
                    b = _largest_batch(lambda n, o=opts: make(o, n), max_batch_limit)
                    plan.max_batches.append(dict(checkpointing=ckpt, optimizer=opt, cpu_offload=off, max_batch=b,
                                                 peak_bytes=make(opts, b).peak_bytes if b else None))
    return plan


def _largest_batch(plan_at: Any, limit: int) -> int:
    """The largest per-GPU batch b ≤ ``limit`` with ``plan_at(b).fits`` (0: not even 1). The peak grows with b; a
    first guess extrapolates the peaks at 1 and 2 linearly, then exact plans step to the boundary."""
    p1 = plan_at(1)
    if not p1.fits:
        return 0
    if limit == 1:
        return 1
    slope = plan_at(2).peak_bytes - p1.peak_bytes
    guess = limit if slope <= 0 else 1 + (p1.usable_bytes - p1.peak_bytes) // slope
    b = max(1, min(limit, int(guess)))
    if plan_at(b).fits:
        while b < limit and plan_at(b + 1).fits:
            b += 1
    else:
        while b > 1 and not plan_at(b).fits:
            b -= 1
    return b


def _savings_notes(cfg: Any, plan: MemoryPlan, vae_ckpt_saving: int, dino_ckpt_saving: int, teacher_sharded: bool,
                   shard: int) -> list[str]:
    """What the main alternatives would change (GiB per GPU), for the user to weigh."""
    notes = []
    o = plan.options
    held = plan.activations["VAE decode (grad)"] / GIB
    if vae_ckpt_saving > 0 and o.vae_checkpointing:
        notes.append(f"train.vae_gradient_checkpointing=true: the VAE decode with grad holds {held:.2f} GiB, "
                     f"{vae_ckpt_saving / GIB:.2f} GiB less than without")
    elif vae_ckpt_saving > 0:
        notes.append(f"the VAE decode with grad holds {held:.2f} GiB; train.vae_gradient_checkpointing=true would "
                     f"save {vae_ckpt_saving / GIB:.2f} GiB")
    if dino_ckpt_saving > 0 and o.dino_checkpointing:
        notes.append(f"discriminator.gradient_checkpointing=true: the DINOv2 layers in the G step hold "
                     f"{dino_ckpt_saving / GIB:.2f} GiB less than without")
    elif dino_ckpt_saving > 0:
        notes.append(f"discriminator.gradient_checkpointing=true (the DINOv2 layers in the G step) would save "
                     f"{dino_ckpt_saving / GIB:.2f} GiB")
    text = [r for r in plan.networks if r.key.startswith("text:") or r.key == "disc_text"]
    if o.text_cache:
        notes.append("data.text_cache is set: no text encoder is loaded (the family's nor D's CLIP text model)")
    elif text:
        notes.append(f"data.text_cache (senseflow data text-cache) would save "
                     f"{sum(r.param_bytes for r in text) / GIB:.2f} GiB: no text encoder on the GPU")
    teacher_text = [r for r in text if r.key.startswith("text:")]
    if cfg.teacher.text_encoder_dtype == "float32" and teacher_text:
        saving = sum(r.param_bytes for r in teacher_text) // 2
        notes.append(f"teacher.text_encoder_dtype=bfloat16 would save {saving / GIB:.2f} GiB")
    teacher = next(r for r in plan.networks if r.key == "teacher")
    if teacher_sharded and not plan.options.cpu_offload:
        extra = teacher.param_bytes * shard - teacher.param_bytes
        notes.append(f"the teacher is FSDP-sharded here; replicating it (--teacher replicate) costs "
                     f"{extra / GIB:.2f} GiB more")
    return notes

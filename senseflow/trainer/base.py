"""DistillationTrainer: the order of updates, optimisers, precision, logging and checkpoints (docs/method.md §1.3).

Per iteration ``it`` (counting from 1):

1. draw the shared decisions (backward-simulation coin, anchor index k, guidance scales);
2. for each of ``grad_accum`` micro-batches: build the generator input and run G (with grad iff
   ``it mod GD == 0``); on generator iterations accumulate ∇L_G while the discriminator heads are frozen, so D
   never receives the generator's adversarial term (decision 2);
3. on generator iterations: clip, step G, then IDA φ ← λφ + (1−λ)θ (§7), then the EMA;
4. fake score: accumulate ∇L_F over the micro-batches' detached samples, clip, step (every iteration);
5. discriminator heads: accumulate the hinge loss, clip, step (every iteration);
6. every LR scheduler steps once per iteration; log (losses averaged over the ranks), preview and checkpoint on
   their periods.

The trainer computes no loss itself: :class:`~senseflow.method.distill.Distiller` does.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from senseflow import dist as sfdist
from senseflow.config import resolved_yaml, save_resolved
from senseflow.data.seeding import mix_seed
from senseflow.data.training import build_training_data
from senseflow.imageio import save_grid
from senseflow.method.distill import Decisions, Distiller, MicroBatch
from senseflow.method.ida import ida_update
from senseflow.method.rng import RunRNG
from senseflow.method.sampling import sample_stochastic
from senseflow.models.families import build_family
from senseflow.quiet import quiet_libraries
from senseflow.trainer.checkpoint import TEST_KILL_AT_ENV, Checkpointer, init_optimizer_state, kill_if_requested
from senseflow.trainer.logger import RunLogger
from senseflow.trainer.optim import EMA, build_optimizer, build_scheduler, require_optimizer_backend

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: debug: gather and compare the shared decisions of every iteration across ranks (always done for the first one)
CHECK_DECISIONS_ENV = "SENSEFLOW_DEBUG_CHECK_DECISIONS"


def dtype_of(name: str) -> torch.dtype:
    return _DTYPES[str(name)]


class DistillationTrainer:
    """Shared trainer of every SenseFlow / DMD2 preset. Subclasses only name their family and method."""

    #: the teacher family this trainer distils (checked against ``teacher.family``)
    family_name: str | None = None
    #: "senseflow" or "dmd2" (checked against ``method.name``)
    method_name: str = "senseflow"

    def __init__(self, cfg: Any, save_path: str | Path) -> None:
        self.cfg = cfg
        self.run_dir = Path(save_path)
        if self.family_name is not None and cfg.teacher.family != self.family_name:
            raise ValueError(
                f"{type(self).__name__} distils teacher.family={self.family_name!r}, config has {cfg.teacher.family!r}"
            )
        if cfg.method.name != self.method_name:
            raise ValueError(
                f"{type(self).__name__} runs method.name={self.method_name!r}, config has {cfg.method.name!r}"
            )
        require_optimizer_backend(str(cfg.optimizer.name))

    # ================================================================== setup
    def setup(self) -> None:
        cfg = self.cfg
        quiet_libraries()
        # G's LR scheduler steps every iteration although G steps every GD-th (§1.3); a single process saves DCP
        # checkpoints without a process group. Both are intended.
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        self.info = sfdist.init_distributed(str(cfg.train.device), str(cfg.dist.backend))
        self.device = self.info.device
        torch.manual_seed(int(cfg.experiment.seed) + self.info.rank)
        self.rng = RunRNG(int(cfg.experiment.seed), self.info.rank, slots=self.samples_per_iteration)
        self.autocast_dtype = self._autocast_dtype()
        self.shard_opts = self._shard_options()
        self._decisions_checked = False
        if self.info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_resolved(cfg, self.run_dir)
        sfdist.barrier()
        self._build_networks()
        self._build_data()
        self._build_optimizers()
        self.iteration = 0
        self.checkpointer = Checkpointer(self.run_dir, int(cfg.train.keep_last), self.info.rank)
        self._resume()

    @property
    def samples_per_iteration(self) -> int:
        """Per-rank samples of one iteration (batch size × accumulation steps): one noise slot each."""
        return int(self.cfg.train.batch_size) * int(self.cfg.train.grad_accum)

    def _autocast_dtype(self) -> torch.dtype | None:
        mode = str(self.cfg.train.mixed_precision)
        if mode == "fp32":
            return None
        if mode == "bf16":
            return torch.bfloat16
        # auto: bf16 compute on accelerators that support it, fp32 on CPU
        return torch.bfloat16 if self.device.type == "cuda" and torch.cuda.is_bf16_supported() else None

    def _shard_options(self) -> sfdist.ShardOptions:
        """Placement of G, F and T (see :mod:`senseflow.dist`). Per-block activation checkpointing is on with
        ``train.gradient_checkpointing`` (§3.1)."""
        d = self.cfg.dist
        strategy = sfdist.resolve_strategy(str(d.strategy), self.info)
        ckpt = bool(self.cfg.train.gradient_checkpointing)
        return sfdist.ShardOptions(strategy=strategy, hsdp=bool(d.hsdp), cpu_offload=bool(d.cpu_offload),
                                   activation_checkpointing=ckpt, compute_dtype=self.autocast_dtype)

    def _build_networks(self) -> None:
        cfg = self.cfg
        t = cfg.teacher
        self.family = build_family(t, self.device)
        res = int(t.resolution)
        self.schedule = self.family.schedule(res, res)
        anchors = self.family_anchors()
        self.anchors = anchors.to(self.device)
        opts = self.shard_opts
        opts.block_types = tuple(self.family.block_types()) if hasattr(self.family, "block_types") else ()
        # Under FSDP2 only rank 0 reads the teacher (into host memory) and builds G and F from it; the other ranks
        # build meta copies, and each network is sharded and filled from rank 0 before the next one is built.
        fsdp = opts.strategy == "fsdp"
        host: dict[str, nn.Module] = {}

        def teacher_full() -> nn.Module:
            if "teacher" not in host:
                host["teacher"] = self.family.load_denoiser(dtype_of(t.dtype), device="cpu" if fsdp else None)
            return host["teacher"]

        def student() -> nn.Module:
            return self.family.build_student(teacher_full()).to(torch.float32)

        self.generator = sfdist.build_sharded(student, self.info, opts, trainable=True)
        self.fake = sfdist.build_sharded(student, self.info, opts, trainable=True)
        self.teacher = sfdist.build_sharded(teacher_full, self.info, opts, trainable=False)
        host.clear()
        self.discriminator = self.text_conditioner = self.dmd2_head = None
        if bool(cfg.method.gan.enabled):
            self._build_discriminator()
        if bool(cfg.method.dmd2_cls.enabled):
            from senseflow.method.distill import sampler_from
            from senseflow.models.dmd2_head import DMD2Classifier

            latent_hw = self.family.latent_shape(res, res)[1:]
            self.dmd2_head = DMD2Classifier.for_unet(
                sfdist.unwrap(self.fake),
                latent_hw,
                self.family,
                self.schedule,
                sampler_from(cfg.method.dmd2_cls.timestep),
            ).to(self.device)
            sfdist.broadcast_module(self.dmd2_head)  # replicated: every rank starts from rank 0's initialisation
        self.distiller = Distiller(
            cfg.method, self.family, self.schedule, self.anchors, self.teacher, self.generator, self.fake,
            self.discriminator, self.text_conditioner, self.dmd2_head,
        )

    def family_anchors(self) -> torch.Tensor:
        s = self.cfg.schedule
        explicit = list(s.anchors) if s.anchors is not None else None
        return self.schedule.anchors(indices=list(s.anchor_indices), explicit=explicit)

    def _build_discriminator(self) -> None:
        from senseflow.models.discriminator import TextConditioner, VFMDiscriminator, load_discriminator_backbones

        d = self.cfg.discriminator
        bb = load_discriminator_backbones(d.dino_path, d.clip_path, self.device, torch.float32)
        self.text_conditioner = TextConditioner(bb.text_model, bb.tokenizer).to(self.device)
        self.discriminator = VFMDiscriminator.from_config(  # the memory plan builds it the same way
            bb.dino, self.text_conditioner.embed_dim, d, image_mean=bb.image_mean, image_std=bb.image_std,
        ).to(self.device)
        sfdist.broadcast_module(self.discriminator.heads)  # replicated heads: rank 0's initialisation everywhere

    def _build_data(self) -> None:
        cfg = self.cfg
        self.data = build_training_data(
            cfg.data, int(cfg.train.batch_size), int(cfg.experiment.seed), self.info.rank, self.info.world_size
        )

    def _build_optimizers(self) -> None:
        o = self.cfg.optimizer
        fake_params = list(self.fake.parameters()) + (
            list(self.dmd2_head.parameters()) if self.dmd2_head is not None else []
        )
        self.opt_g = build_optimizer(self.generator.parameters(), float(o.lr_generator), o)
        self.opt_f = build_optimizer(fake_params, float(o.lr_fake), o)
        self.sched_g = build_scheduler(self.opt_g, float(o.lr_generator), o)
        self.sched_f = build_scheduler(self.opt_f, float(o.lr_fake), o)
        self.opt_d = self.sched_d = None
        if self.discriminator is not None:
            self.opt_d = build_optimizer(self.discriminator.trainable_parameters(), float(o.lr_discriminator), o)
            self.sched_d = build_scheduler(self.opt_d, float(o.lr_discriminator), o)
        ema = self.cfg.train.ema
        self.ema = (
            EMA(sfdist.unwrap(self.generator), float(ema.decay), float(ema.warmup)) if bool(ema.enabled) else None
        )
        for opt in (self.opt_g, self.opt_f, self.opt_d):
            if opt is not None:  # state exists before any checkpoint touches it (see init_optimizer_state)
                init_optimizer_state(opt)

    # ================================================================== checkpoints
    def _checkpoint_parts(self) -> tuple[dict, dict, dict]:
        # F's optimiser also holds the DMD2 classifier head when there is one: save them as one module
        fake = self.fake if self.dmd2_head is None else nn.ModuleDict({"fake": self.fake, "dmd2_head": self.dmd2_head})
        models: dict[str, nn.Module] = {"generator": self.generator, "fake": fake}
        optimizers = {"generator": (self.generator, self.opt_g), "fake": (fake, self.opt_f)}
        schedulers: dict[str, Any] = {"generator": self.sched_g, "fake": self.sched_f}
        if self.discriminator is not None:
            models["disc_heads"] = self.discriminator.heads
            optimizers["disc_heads"] = (self.discriminator.heads, self.opt_d)
            schedulers["disc_heads"] = self.sched_d
        return models, optimizers, schedulers

    def _sharded_state(self) -> dict[str, Any]:
        """Extra tensors saved through DCP: the EMA (DTensor shards under FSDP2)."""
        return {"ema": self.ema.state_dict()} if self.ema is not None else {}

    def save(self) -> Path:
        """Checkpoint the run (every rank; see :mod:`senseflow.trainer.checkpoint` for the layout)."""
        models, optimizers, schedulers = self._checkpoint_parts()
        trainer_state = {
            "iteration": self.iteration,
            "world_size": self.info.world_size,
            "data": self.data.state_dict(),  # a global consumed-sample count: the same on every rank
            "rng_shared": self.rng.shared.get_state(),
            "schedulers": {k: s.state_dict() for k, s in schedulers.items()},
            "ema_updates": self.ema.num_updates if self.ema is not None else 0,
        }
        rank_state = {"rng": self.rng.state_dict(), "torch_rng": torch.get_rng_state()}

        def student() -> dict[str, torch.Tensor]:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return get_model_state_dict(self.generator, options=opts)

        def student_ema(full_student: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return self.ema.full_weights(full_student)

        sfdist.reshard(self.generator)
        sfdist.reshard(self.fake)
        return self.checkpointer.save(
            self.iteration, models, optimizers, self._sharded_state(), trainer_state, rank_state, student,
            resolved_yaml(self.cfg), student_ema if self.ema is not None else None,
        )

    def _resume(self) -> None:
        """Continue from ``checkpoints/latest`` if there is one (resuming is running the same command again).

        Everything global is restored exactly: networks, optimisers, LR schedulers, EMA, iteration, the data
        position and the shared RNG stream (so shared decisions stay identical on every rank). Each rank restores
        its own noise streams from ``rank{r}_state.pt``. On a different number of processes: ranks that wrote no
        file (more processes now) start fresh noise streams seeded from (seed, iteration, rank); the streams of
        ranks that no longer exist (fewer processes now) are dropped; the data position is kept (rounded down to a
        multiple of the new world size). Such a run continues correctly but is not bit-identical to any
        uninterrupted run, since the global batch itself changed.
        """
        path = self.checkpointer.latest()
        if path is None:
            return
        models, optimizers, schedulers = self._checkpoint_parts()
        sharded = self._sharded_state()
        state, mine = self.checkpointer.load(path, models, optimizers, sharded)
        self.iteration = int(state["iteration"])
        if self.ema is not None:
            self.ema.load_state_dict(sharded["ema"])
            self.ema.num_updates = int(state.get("ema_updates", 0))
        for k, s in schedulers.items():
            s.load_state_dict(state["schedulers"][k])
        seed, slots = int(self.cfg.experiment.seed), self.samples_per_iteration
        if (
            mine is not None
            and all(f"noise_{i}" in mine["rng"] for i in range(slots))
            and f"noise_{slots}" not in mine["rng"]
        ):
            self.rng.load_state_dict(mine["rng"])
            torch.set_rng_state(mine["torch_rng"])
        else:
            self.rng = RunRNG(mix_seed(seed, self.iteration), self.info.rank, slots=slots)
            if self.info.is_main or mine is None:
                print(f"[senseflow] rank {self.info.rank}: no noise streams of this rank and batch layout in {path}; "
                      f"fresh per-rank streams seeded from (seed, iteration {self.iteration}, rank)", flush=True)
        self.rng.shared.set_state(state["rng_shared"])
        self.data.load_state_dict(state["data"])
        if self.info.is_main:
            self._rewind_metrics(self.iteration)
            saved_world = int(state.get("world_size", self.info.world_size))
            note = (f" (written by {saved_world} process{'es' if saved_world > 1 else ''}, now {self.info.world_size})"
                    if saved_world != self.info.world_size else "")
            print(f"[senseflow] resumed from {path} at iteration {self.iteration}{note}", flush=True)

    def _rewind_metrics(self, iteration: int) -> None:
        """Drop metrics.jsonl rows logged after ``iteration`` by a run that died before its next checkpoint."""
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return
        import json

        def logged_at(line: str) -> int | None:
            try:
                return int(json.loads(line)["iteration"])
            except (ValueError, KeyError, TypeError):
                return None  # a line cut short by the kill

        lines = path.read_text(encoding="utf-8").splitlines()
        kept = [ln for ln in lines if (logged_at(ln) or iteration + 1) <= iteration]
        if len(kept) != len(lines):
            tmp = path.with_name(".metrics.jsonl.tmp")
            tmp.write_text("".join(ln + "\n" for ln in kept), encoding="utf-8")
            os.replace(tmp, path)

    # ================================================================== training
    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def prepare(self, batch: dict[str, Any], d: Decisions, noise: list[torch.Generator]) -> MicroBatch:
        """Text condition, real latents and pixels, generator input (all without grad)."""
        with torch.no_grad():
            captions = list(batch["caption"])
            cond = self.family.encode_prompts(
                captions, original_sizes=batch.get("original_size"), crop_coords=batch.get("crop_coords")
            ).to(self.device)
            if "latents" in batch:
                real_latents = batch["latents"].to(self.device, torch.float32)
                real_pixels = (
                    self.family.decode_latents(real_latents).float() if self.discriminator is not None else None
                )
            else:
                real_pixels = batch["pixels"].to(self.device, torch.float32)
                real_latents = self.family.encode_pixels(real_pixels, generator=noise).float()
            text_embed = self.text_conditioner(captions) if self.text_conditioner is not None else None
            ref_feats = self.discriminator.reference_features(real_pixels) if self.discriminator is not None else None
            with self.autocast():
                x_in, tau_k = self.distiller.generator_input(real_latents, cond, d, noise)
        return MicroBatch(cond=cond, text_embed=text_embed, real_pixels=real_pixels, real_latents=real_latents,
                          x_in=x_in.float(), tau_k=tau_k, ref_feats=ref_feats, noise=noise)

    def _clip_and_step(self, net: nn.Module, params: Any, opt: torch.optim.Optimizer) -> float:
        """Average replicated gradients over ranks (FSDP2 shards are reduced already), clip the global norm, step."""
        clip = self.cfg.optimizer.grad_clip  # None: no clipping (the norm is still measured and logged)
        params = list(params)
        sfdist.sync_replicated_grads(params)
        norm = sfdist.clip_grad_norm(params, None if clip is None else float(clip))
        sfdist.reshard(net)  # a root gathered by a forward without backward would otherwise keep stale weights
        opt.step()
        opt.zero_grad(set_to_none=True)
        return norm

    def _check_decisions(self, it: int, d: Decisions) -> None:
        """Gather this iteration's shared decisions from every rank and fail unless they agree (the first iteration
        of every process, and every iteration with SENSEFLOW_DEBUG_CHECK_DECISIONS=1)."""
        if not self.info.distributed or (self._decisions_checked and os.environ.get(CHECK_DECISIONS_ENV) != "1"):
            return
        mid = None if d.isg_mid is None else [float(v) for v in torch.as_tensor(d.isg_mid).reshape(-1)]
        values = (bool(d.backsim), int(d.k), float(d.dmd_guidance), float(d.isg_guidance), mid)
        sfdist.assert_same_on_all_ranks(
            values, f"iteration {it}: shared decisions (backsim, k, guidance, ISG mid-point)"
        )
        self._decisions_checked = True

    def train_iteration(self, it: int) -> dict[str, float]:
        """One iteration in the order of §1.3; returns the logs (losses, grad norms, LRs)."""
        cfg = self.cfg
        accum = int(cfg.train.grad_accum)
        do_g = it % int(cfg.method.gd) == 0
        d = self.distiller.draw_decisions(self.rng)
        self._check_decisions(it, d)
        logs: dict[str, float] = {"decision/backsim": float(d.backsim), "decision/k": float(d.k)}
        b = int(cfg.train.batch_size)
        micro = [self.prepare(self.data.next(), d, self.rng.noise(m * b, b)) for m in range(accum)]

        # ---- generator ----
        heads = self.discriminator.heads if self.discriminator is not None else None
        for mb in micro:
            with torch.set_grad_enabled(do_g), self.autocast():
                mb.pred = self.family.predict(self.generator, mb.x_in, mb.tau_k, mb.cond).float()
                mb.x0_hat = self.schedule.x0_from(mb.x_in, mb.pred, mb.tau_k)
            if do_g:
                if heads is not None:
                    heads.requires_grad_(False)  # D never receives the generator's adversarial gradient
                with self.autocast():
                    loss_g, g_logs = self.distiller.generator_loss(mb, d)
                (loss_g / accum).backward()
                if heads is not None:
                    heads.requires_grad_(True)
                self._accumulate(logs, g_logs, accum)
            mb.x0_hat, mb.pred = mb.x0_hat.detach(), None
            if self.discriminator is not None and mb.fake_pixels is None:  # G's adversarial pass decodes it otherwise
                with torch.no_grad():
                    mb.fake_pixels = self.family.decode_latents(mb.x0_hat).float()
        if do_g:
            logs["grad_norm/generator"] = self._clip_and_step(self.generator, self.generator.parameters(), self.opt_g)
            self.opt_f.zero_grad(set_to_none=True)
            if bool(cfg.method.ida.enabled):
                sfdist.reshard(self.fake)  # IDA pairs local shards by name
                sfdist.reshard(self.generator)
                ida_update(self.fake, self.generator, float(cfg.method.ida.lam))
            if self.ema is not None:
                self.ema.update(sfdist.unwrap(self.generator))
        self.sched_g.step()

        # ---- fake score ----
        for mb in micro:
            with self.autocast():
                loss_f, f_logs = self.distiller.fake_loss(mb)
            (loss_f / accum).backward()
            self._accumulate(logs, f_logs, accum)
        fake_params = list(self.fake.parameters()) + (
            list(self.dmd2_head.parameters()) if self.dmd2_head is not None else []
        )
        logs["grad_norm/fake"] = self._clip_and_step(self.fake, fake_params, self.opt_f)
        self.sched_f.step()

        # ---- discriminator heads ----
        if self.discriminator is not None:
            self.opt_d.zero_grad(set_to_none=True)
            for mb in micro:
                with self.autocast():
                    loss_d, d_logs = self.distiller.discriminator_loss(mb, d.k)
                (loss_d / accum).backward()
                self._accumulate(logs, d_logs, accum)
            logs["grad_norm/discriminator"] = self._clip_and_step(heads, heads.parameters(), self.opt_d)
            self.sched_d.step()

        logs["lr/generator"] = self.opt_g.param_groups[0]["lr"]
        logs["lr/fake"] = self.opt_f.param_groups[0]["lr"]
        logs["step/generator"] = float(do_g)
        return logs

    @staticmethod
    def _accumulate(logs: dict[str, float], new: dict[str, float], accum: int) -> None:
        for k, v in new.items():
            logs[k] = logs.get(k, 0.0) + float(v) / accum

    def train(self) -> None:
        cfg = self.cfg
        total = int(cfg.train.iterations)
        logger = RunLogger(self.run_dir, total, self.iteration, self.info.is_main, self.device)
        log_every, save_every = int(cfg.train.log_interval), int(cfg.train.save_interval)
        preview_every = int(cfg.train.preview_interval)
        try:
            while self.iteration < total:
                it = self.iteration + 1
                t0 = time.perf_counter()
                logs = self.train_iteration(it)
                logs["time/iteration_s"] = time.perf_counter() - t0
                self.iteration = it
                kill_if_requested(TEST_KILL_AT_ENV, it)  # test-only hook (see senseflow.trainer.checkpoint)
                for k, v in logs.items():
                    if k.startswith("loss/") and not math.isfinite(v):
                        raise FloatingPointError(f"iteration {it}: {k} = {v} is not finite")
                logger.progress(
                    it, {k: v for k, v in logs.items() if k in ("loss/generator", "loss/fake", "loss/d_real")}
                )
                if it % log_every == 0 or it == total:
                    logger.scalars(it, logs)
                if preview_every > 0 and (it % preview_every == 0 or it == total):
                    self.preview(it)
                if (save_every > 0 and it % save_every == 0) or it == total:
                    self.save()
        finally:
            logger.close()

    @torch.no_grad()
    def preview(self, it: int) -> Path | None:
        """A full few-step sample of the fixed preview prompts as one image grid (written by rank 0; under FSDP2
        every rank runs the sharded generator with the same inputs)."""
        prompts = list(self.cfg.train.preview_prompts)
        if not prompts or not (self.info.is_main or sfdist.is_sharded(self.generator)):
            return None
        cond = self.family.encode_prompts(prompts).to(self.device)
        res = int(self.cfg.teacher.resolution)
        shape = (len(prompts), *self.family.latent_shape(res, res))
        gen = torch.Generator().manual_seed(int(self.cfg.experiment.seed))
        with self.autocast():
            latents = sample_stochastic(self.family, self.generator, cond, self.anchors, gen, shape)
        if not self.info.is_main:
            return None
        images = self.family.decode_latents(latents.float())
        return save_grid(images, self.run_dir / "previews" / f"iter_{it:06d}.png")

    def run(self) -> None:
        self.setup()
        try:
            self.train()
        finally:
            sfdist.cleanup()

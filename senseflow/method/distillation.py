"""SenseFlow and the DMD2 baseline declared as players (docs/method.md §1.2-§1.3, §3.1, §3.4, §7).

Networks (§3.1): G_θ and F_φ start as fp32 copies of the frozen teacher T; with the GAN (§9) the VFM discriminator
D_ψ (frozen DINOv2 backbone, trained heads) and its frozen CLIP text conditioner; with DMD2's classifier (§11) a head
on F's bottleneck, trained with F.

Players, in the order of one iteration (§1.3):

* ``generator``: G_θ every GD-th iteration on L_G = L_DMD + L_adv + λ_ISG·L_ISG (+ DMD2's classifier term), with D's
  heads frozen so that D never receives G's adversarial gradient (decision 2). Its forward runs on every iteration
  (without grad when G does not step): x̂₀ feeds F and D. After each of its steps: IDA φ ← λ·φ + (1 − λ)·θ (§7),
  then the EMA θ̄ ← d_n·θ̄ + (1 − d_n)·θ (``train.ema``).
* ``fake``: F_φ (and the DMD2 head) every iteration on L_F (§6, §11).
* ``disc_heads``: D_ψ's heads every iteration on the hinge loss weighted by w(τ_k) (§9.3, §10).

The losses themselves are :class:`~senseflow.method.distill.Distiller`'s; this module builds the networks, the
micro-batches and the players, and the generic trainer (:mod:`senseflow.trainer.base`) steps them.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, cast

import torch
from torch import Tensor, nn

from senseflow import dist as sfdist
from senseflow.core.checks import need
from senseflow.core.dtypes import parse_dtype
from senseflow.core.modules import unwrap
from senseflow.core.rng import RunRNG
from senseflow.method.adapters import (
    SharedBase,
    adapter_file_name,
    adapter_specs,
    adapter_state,
    check_lora_fits_teacher,
    ida_on_adapters,
    merged_weights,
)
from senseflow.method.distill import Decisions, Distiller, MicroBatch, sampler_from
from senseflow.method.ida import ida_update
from senseflow.method.optim import EMA, build_optimizer, build_scheduler
from senseflow.method.players import Player, Runtime, Stateful
from senseflow.method.sampling import sample_stochastic
from senseflow.models.families import build_family, check_guidance_kinds

if TYPE_CHECKING:
    from senseflow.data.cache import TextCache
    from senseflow.models.discriminator import CachedTextConditioner, TextConditioner, VFMDiscriminator
    from senseflow.models.dmd2_head import DMD2Classifier

__all__ = ["Distillation", "build_discriminator", "STUDENT_FILE", "STUDENT_EMA_FILE"]

#: the consolidated generator and its EMA, written beside every checkpoint (:meth:`Distillation.exports`) and read
#: by inference, export and evaluation (:data:`senseflow.checkpoint_io.STUDENT_FILES`)
STUDENT_FILE = "student.safetensors"
STUDENT_EMA_FILE = "student_ema.safetensors"


def build_discriminator(cfg: Any, device: torch.device, text_cache: TextCache | None = None
                        ) -> tuple[TextConditioner | CachedTextConditioner, VFMDiscriminator]:
    """The CLIP text conditioner and the VFM discriminator D_ψ of ``cfg.discriminator`` (§9), heads replicated from
    rank 0's initialisation. With a ``text_cache`` (``data.text_cache``) the CLIP text model is not loaded: the
    conditioner reads the cached features. The memory plan builds D through the same
    ``VFMDiscriminator.from_config``."""
    from senseflow.models.discriminator import (
        CachedTextConditioner,
        TextConditioner,
        VFMDiscriminator,
        load_discriminator_backbones,
    )

    d = cfg.discriminator
    bb = load_discriminator_backbones(d.dino_path, d.clip_path, device, torch.float32, text=text_cache is None)
    text_conditioner: TextConditioner | CachedTextConditioner
    if text_cache is None:
        text_conditioner = TextConditioner(need(bb.text_model, "the CLIP text model"), bb.tokenizer).to(device)
    else:
        width = int(text_cache.stack([""], "clip").shape[-1])
        text_conditioner = CachedTextConditioner(lambda p: text_cache.stack(p, "clip"), width).to(device)
    discriminator = VFMDiscriminator.from_config(
        need(bb.dino, "the DINOv2 backbone"), text_conditioner.embed_dim, d, image_mean=bb.image_mean,
        image_std=bb.image_std,
    ).to(device)
    sfdist.broadcast_module(discriminator.heads)  # replicated heads: rank 0's initialisation everywhere
    return text_conditioner, discriminator


class Distillation:
    """SenseFlow (IDA + ISG + VFM GAN) or the DMD2 baseline, configured by ``cfg.method``, as players."""

    def __init__(self, cfg: Any, rt: Runtime) -> None:
        self.cfg, self.info, self.device, self.autocast = cfg, rt.info, rt.info.device, rt.autocast
        self._build_networks(rt.shard)
        self.players = self._build_players()

    # ================================================================== networks (§3.1)
    def _build_networks(self, opts: sfdist.ShardOptions) -> None:
        cfg, t = self.cfg, self.cfg.teacher
        check_guidance_kinds(cfg)  # the guidance kinds fit the teacher folder: read from configs, before any load
        self.text_cache = self._open_text_cache()  # refused when stale, before any network loads
        self.family = build_family(t, self.device)
        self.family.text_cache = self.text_cache  # with a cache the family loads no text encoder
        specs = adapter_specs(cfg.model.lora, tuple(self.family.lora_target_modules))
        check_lora_fits_teacher(self.family, specs)  # LoRA players (§3.8): adapters on the teacher's own network
        res = int(t.resolution)
        self.schedule = self.family.schedule(res, res)
        s = cfg.schedule
        explicit = list(s.anchors) if s.anchors is not None else None
        self.anchors = self.schedule.anchors(indices=list(s.anchor_indices), explicit=explicit).to(self.device)
        opts.block_types = tuple(self.family.block_types()) if hasattr(self.family, "block_types") else ()
        # Under FSDP2 only rank 0 reads the teacher (into host memory) and builds G and F from it; the other ranks
        # build meta copies, and each network is sharded and filled from rank 0 before the next one is built.
        fsdp = opts.strategy == "fsdp"
        host: dict[str, nn.Module] = {}

        def teacher_full() -> nn.Module:
            if "teacher" not in host:
                dtype = parse_dtype(t.dtype, "teacher.dtype")
                host["teacher"] = self.family.load_denoiser(dtype, device="cpu" if fsdp else None)
            return host["teacher"]

        def student() -> nn.Module:
            return self.family.build_student(teacher_full()).to(torch.float32)

        # §3.8: a LoRA player is an adapter on the teacher's network, which T, G and F then share (built last: the
        # full copies are made from the plain teacher first); the others are full fp32 copies as in §3.1
        self.shared: SharedBase | None = None
        if "student" not in specs:
            self.generator = sfdist.build_sharded(student, self.info, opts, trainable=True)
        if "fake" not in specs:
            self.fake = sfdist.build_sharded(student, self.info, opts, trainable=True)
        if not specs:
            self.teacher = sfdist.build_sharded(teacher_full, self.info, opts, trainable=False)
        else:
            base = sfdist.build_sharded(teacher_full, self.info, opts, trainable=False,
                                        adapt=lambda net: SharedBase.add_adapters(net, specs))
            shared = self.shared = SharedBase(base, specs)
            if opts.activation_checkpointing:  # the recomputation must run the forward's adapter
                cast(Any, base).enable_gradient_checkpointing(shared.checkpoint_function())
            self.teacher = shared.view(None)
            if "student" in specs:
                self.generator = shared.view("student")
            if "fake" in specs:
                self.fake = shared.view("fake")
        host.clear()
        #: what each player trains: an adapter's weights (§3.8) or the full network; the net that runs G
        self.generator_params: nn.Module = self.generator
        self.fake_params: nn.Module = self.fake
        self.generator_net: nn.Module = self.generator
        if self.shared is not None:
            self.generator_params = self.shared.weights.get("student", self.generator)
            self.fake_params = self.shared.weights.get("fake", self.fake)
            self.generator_net = self.shared.base if "student" in specs else self.generator
        self.discriminator: VFMDiscriminator | None = None
        self.text_conditioner: TextConditioner | CachedTextConditioner | None = None
        self.dmd2_head: DMD2Classifier | None = None
        if bool(cfg.method.gan.enabled):
            self.text_conditioner, self.discriminator = build_discriminator(cfg, self.device, self.text_cache)
        if bool(cfg.train.vae_gradient_checkpointing):  # the decode with grad of L_adv keeps block inputs only
            cast(Any, self.family).vae.enable_gradient_checkpointing()  # diffusers' decoder blocks (a DiffusersFamily)
        if bool(cfg.method.dmd2_cls.enabled):
            from senseflow.models.dmd2_head import DMD2Classifier

            latent_hw = self.family.latent_shape(res, res)[1:]
            self.dmd2_head = DMD2Classifier.for_unet(
                unwrap(self.fake), latent_hw, self.family, self.schedule,
                sampler_from(cfg.method.dmd2_cls.timestep),
            ).to(self.device)
            sfdist.broadcast_module(self.dmd2_head)  # replicated: every rank starts from rank 0's initialisation
        self.distiller = Distiller(
            cfg.method, self.family, self.schedule, self.anchors, self.teacher, self.generator, self.fake,
            self.discriminator, self.text_conditioner, self.dmd2_head,
        )

    def _open_text_cache(self) -> TextCache | None:
        """``data.text_cache`` checked against this config (docs/method.md §13.5), or None (encode on the fly)."""
        if self.cfg.data.text_cache is None:
            return None
        from senseflow.data.text_cache import open_text_cache

        return open_text_cache(self.cfg)

    # ================================================================== players (§1.3, §3.4, §3.7)
    def _build_players(self) -> list[Player]:
        o, ema = self.cfg.optimizer, self.cfg.train.ema
        self.ema = (
            EMA(unwrap(self.generator_params), float(ema.decay), float(ema.warmup)) if bool(ema.enabled) else None
        )

        def player(name: str, module: nn.Module, lr: float, loss: Callable, **kw: Any) -> Player:
            opt = build_optimizer(module.parameters(), float(lr), o)
            return Player(name, module, opt, build_scheduler(opt, float(lr), o), loss, **kw)

        after_g: list[Callable[[], dict[str, float] | None]] = []
        if bool(self.cfg.method.ida.enabled):
            after_g.append(self.ida)
        ema_g = self.ema
        if ema_g is not None:
            after_g.append(lambda: ema_g.update(unwrap(self.generator_params)))
        heads = self.discriminator.heads if self.discriminator is not None else None
        # F's optimiser also holds the DMD2 classifier head when there is one: one module, one optimiser
        fake = (self.fake_params if self.dmd2_head is None
                else nn.ModuleDict({"fake": self.fake_params, "dmd2_head": self.dmd2_head}))
        players = [
            player("generator", self.generator_params, o.lr_generator, self.generator_loss,
                   every=int(self.cfg.method.gd), frozen=(heads,) if heads is not None else (), post_step=after_g),
            player("fake", fake, o.lr_fake, self.fake_loss),
        ]
        if heads is not None:
            players.append(player("disc_heads", heads, o.lr_discriminator, self.discriminator_loss,
                                  label="discriminator"))
        return players

    def ida(self) -> dict[str, float] | None:
        """IDA after a generator step: φ ← λ·φ + (1 − λ)·θ, matched by name (§7); on two adapters, F's adapter
        becomes the best rank-r factors of the mix (§7.1), whose truncation error is logged."""
        sfdist.reshard(self.fake_params)  # IDA pairs local shards by name
        sfdist.reshard(self.generator_params)
        lam = float(self.cfg.method.ida.lam)
        if self.shared is not None:  # validation allows IDA with adapters only when both players are adapters
            return ida_on_adapters(self.shared.weights["fake"], self.shared.weights["student"], lam)
        ida_update(self.fake, self.generator, lam)
        return None

    # ================================================================== one iteration
    def draw(self, rng: RunRNG) -> Decisions:
        """The shared decisions of the iteration (coin, k, guidance scales, ISG mid-point)."""
        return self.distiller.draw_decisions(rng)

    def micro_batches(self, d: Decisions, rng: RunRNG, next_batch: Callable[[], dict[str, Any]]) -> list[MicroBatch]:
        """``train.grad_accum`` micro-batches of ``train.batch_size`` samples, noise slots in order."""
        b = int(self.cfg.train.batch_size)
        return [self.prepare(next_batch(), d, rng.noise(m * b, b)) for m in range(int(self.cfg.train.grad_accum))]

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
            ref_feats = None
            if self.discriminator is not None:
                ref_feats = self.discriminator.reference_features(need(real_pixels, "the real pixels"))
            with self.autocast():
                x_in, tau_k = self.distiller.generator_input(real_latents, cond, d, noise)
        return MicroBatch(cond=cond, text_embed=text_embed, real_pixels=real_pixels, real_latents=real_latents,
                          x_in=x_in.float(), tau_k=tau_k, ref_feats=ref_feats, noise=noise, decisions=d)

    def generator_loss(self, mb: MicroBatch, due: bool) -> tuple[Tensor | None, dict[str, float]]:
        """G's forward x̂₀ = x0_from(G(x_in, τ_k, c)) (with grad iff ``due``) and, when due, L_G. Leaves x̂₀ detached
        on ``mb`` for F and D, and its decoded pixels for D (decoded by L_adv already on generator iterations)."""
        with torch.set_grad_enabled(due), self.autocast():
            mb.pred = self.family.predict(self.generator, mb.x_in, mb.tau_k, mb.cond).float()
            mb.x0_hat = self.schedule.x0_from(mb.x_in, mb.pred, mb.tau_k)
        loss: Tensor | None = None
        logs: dict[str, float] = {}
        if due:
            with self.autocast():
                loss, logs = self.distiller.generator_loss(mb, need(mb.decisions, "the iteration's decisions"))
        mb.x0_hat, mb.pred = mb.x0_hat.detach(), None
        if self.discriminator is not None and mb.fake_pixels is None:
            with torch.no_grad():
                mb.fake_pixels = self.family.decode_latents(mb.x0_hat).float()
        return loss, logs

    def fake_loss(self, mb: MicroBatch, due: bool) -> tuple[Tensor, dict[str, float]]:
        """L_F on the detached x̂₀ (+ DMD2's guidance classifier term)."""
        with self.autocast():
            return self.distiller.fake_loss(mb)

    def discriminator_loss(self, mb: MicroBatch, due: bool) -> tuple[Tensor, dict[str, float]]:
        """D's hinge loss on real r and the detached fake decode, weighted by w(τ_k)."""
        with self.autocast():
            return self.distiller.discriminator_loss(mb, need(mb.decisions, "the iteration's decisions").k)

    # ================================================================== checkpoints, exports, previews
    def extra_state(self) -> dict[str, Stateful]:
        """G's EMA θ̄ (DTensor shards under FSDP2), saved through DCP."""
        return {"ema": self.ema} if self.ema is not None else {}

    def host_state(self) -> dict[str, Any]:
        return {"ema_updates": self.ema.num_updates} if self.ema is not None else {}

    def load_host_state(self, state: dict[str, Any]) -> None:
        if self.ema is not None:
            self.ema.num_updates = int(state.get("ema_updates", 0))  # the EMA's warm-up continues where it was

    def exports(self) -> dict[str, dict[str, Tensor]]:
        """The consolidated student (and its EMA): collectives under FSDP2, empty off rank 0."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        if self.shared is not None and "student" in self.shared.weights:
            return self._adapter_exports(opts)
        # a full, CPU-offloaded model state dict holds plain tensors only
        student = cast(dict[str, Tensor], get_model_state_dict(self.generator, options=opts))
        out = {STUDENT_FILE: student}
        if self.ema is not None:
            out[STUDENT_EMA_FILE] = self.ema.full_weights(student)
        return out

    def _adapter_exports(self, opts: Any) -> dict[str, dict[str, Tensor]]:
        """A LoRA student (§3.8): the merged weights W₀ + s·B·A as ``student.safetensors`` (what inference and export
        read) and the adapter itself (``student_lora.safetensors``: A and s·B per layer), the same for the EMA."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        shared = need(self.shared, "the shared base")
        weights = shared.weights["student"]
        base = cast(dict[str, Tensor], get_model_state_dict(shared.base, options=opts))
        files = {STUDENT_FILE: adapter_state(weights)}
        if self.ema is not None:
            files[STUDENT_EMA_FILE] = adapter_state(weights, self.ema.shadow)
        if not base:  # ranks other than 0 write nothing
            return {}
        out: dict[str, dict[str, Tensor]] = {}
        for name, adapter in files.items():
            factors = {k.removesuffix(".lora_A.weight"): (adapter[k.replace(".lora_A.", ".lora_B.")], adapter[k])
                       for k in adapter if k.endswith(".lora_A.weight")}
            out[name] = merged_weights(base, factors)
            out[adapter_file_name(name)] = adapter
        return out

    @torch.no_grad()
    def preview(self, prompts: list[str], seed: int) -> Tensor | None:
        """A full few-step sample of ``prompts`` (on rank 0; under FSDP2 every rank runs the sharded generator with
        the same inputs), decoded to pixels on rank 0."""
        if not prompts or not (self.info.is_main or sfdist.is_sharded(self.generator_net)):
            return None
        cache = self.text_cache
        if cache is not None and not all(cache.has_caption(p) for p in prompts):
            if not getattr(self, "_preview_note", False) and self.info.is_main:
                print("[senseflow] previews skipped: train.preview_prompts are not all in data.text_cache "
                      "(rebuild it with senseflow data text-cache)", flush=True)
            self._preview_note = True
            return None
        cond = self.family.encode_prompts(prompts).to(self.device)
        res = int(self.cfg.teacher.resolution)
        shape = (len(prompts), *self.family.latent_shape(res, res))
        gen = torch.Generator().manual_seed(int(seed))
        with self.autocast():
            latents = sample_stochastic(self.family, self.generator, cond, self.anchors, gen, shape)
        return self.family.decode_latents(latents.float()) if self.info.is_main else None

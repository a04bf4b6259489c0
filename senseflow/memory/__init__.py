"""Per-GPU memory plan of a SenseFlow run (``senseflow memory``), computed without weights or a GPU.

Every network of the run is built on the ``meta`` device from its architecture config (the real ``config.json``
of the teacher folder when it exists, else the public config shipped in ``senseflow/assets/arch_configs``), so the
parameter counts are the real tensors' ``numel`` and cost no memory. Bytes per GPU, with W the FSDP shard degree
(W = N·M GPUs, or N with ``dist.hsdp``) and ⌈·⌉ the per-tensor dim-0 shard of FSDP2:

* **parameters**: trained nets (G, F: fp32 master weights, docs/method.md decision 2) and the frozen teacher T
  (``teacher.dtype``) hold Σ_tensors ⌈n/W⌉·bytes; replicated nets (VAE, text encoders, DINOv2, D's CLIP text model,
  D heads) hold Σ n·bytes. Buffers (e.g. SD3's positional table) are never sharded.
* **gradients**: fp32, same placement as the trained parameters. The trainer frees them after each player's step
  (``zero_grad(set_to_none=True)``), so only the player being updated holds gradients (see *phases* below).
* **optimiser states**: AdamW: exp_avg + exp_avg_sq in fp32, 8 B/element (+4 B ``step`` per tensor, on the host);
  8-bit AdamW (bitsandbytes): per tensor of n ≥ 4096 elements 2 B/element + 2·4·⌈n/256⌉ B block-wise absmax +
  2·1 KiB quantisation maps; smaller tensors keep 32-bit states (8 B/element).
* **LoRA players** (``model.lora.<player>.rank`` = r > 0): no copy of their own; T's row is the one frozen shared
  base (``teacher.dtype``, sharded once) and the player's row is its peft adapter, built on meta by the trainer's
  ``SharedBase.add_adapters`` on the real layers: r·(in + out) parameters per targeted Linear of in × out, fp32, with
  fp32 gradients and the optimiser state above. **EMA** (``train.ema.enabled``): an fp32 shadow of G's trained
  parameters (the adapter for a LoRA student), placed like them.
* **activations** (bytes autograd keeps for backward): measured by running each network's forward on meta tensors
  under a saved-tensor hook, at ``teacher.resolution`` and ``train.batch_size``, deduplicated by storage and
  excluding parameters. bf16 autocast is emulated (matmul/linear/conv/attention inputs cast to bf16; norms,
  softmax, exp/pow in fp32) and attention is counted as a fused (flash) kernel saving q, k, v, out and the fp32
  log-sum-exp, i.e. no S² matrix. With activation checkpointing only the inputs of each checkpointed unit
  (transformer block, resnet) are kept, plus the saved tensors outside units, plus one unit recomputed at a time:

      A_ckpt = A_outside + Σ_units |inputs(u)| + max_u A(u)        A_full = A_outside + Σ_u A(u)

* **phases** (the peak is the largest; the trainer runs them in this order each iteration):
  - G step, three moments: (1) the no-grad forwards of T, F, G for DMD and ISG while G's graph is alive:
    A(G) + one block + T/F's gathered FSDP units; (2) the VAE decode, DINOv2 and heads, whose activations live until
    the single backward of L_G: A(G) + A(VAE decode) + A(DINOv2 → pixels, heads) + working;
    (3) G's own backward: grads(G) + A(G) + working;
  - F step: grads(F) + A(F) + working;
  - D step: grads(D heads) + 2·A(heads) (real and fake branch in one backward) + working.
  "working" = the largest unit's activations (its gradient buffers during backward) + FSDP's gathered units
  (two units in bf16 — current and prefetched — the root's unsharded params, and one unit's fp32 gradient).
* **CPU offload** (``dist.cpu_offload``): sharded params, grads and optimiser states of G, F (and T) live in host
  memory; the GPU keeps FSDP's working set only.
* **fit**: peak ≤ gpu_gib·(1 − reserve_frac) − context_gib (allocator fragmentation, CUDA context and NCCL).

``main_memory`` prints a table (or ``--json``); :func:`plan_memory` returns the :class:`MemoryPlan`.

Modules: :mod:`.arch` (architecture configs, meta builds), :mod:`.budget` (parameter, gradient and optimiser-state
bytes per player), :mod:`.activations` (activation tracing), :mod:`.networks` (the networks of a run and the trace of
one iteration), :mod:`.plan` (phases, peak, scenarios), :mod:`.report` (the text table), :mod:`.cli` (the command).
"""
from __future__ import annotations

from senseflow.memory.activations import ActivationProfile, trace_activations
from senseflow.memory.arch import ARCH_DIR, arch_names, build_meta, load_arch_config
from senseflow.memory.budget import (
    DTYPE_BYTES,
    GIB,
    MemoryPlanError,
    NetworkMemory,
    optimizer_state_bytes,
    param_shapes,
    shard_numel,
    tensor_bytes,
)
from senseflow.memory.cli import main_memory
from senseflow.memory.networks import analytic_head_params
from senseflow.memory.plan import MemoryOptions, MemoryPlan, plan_memory
from senseflow.memory.report import format_plan

__all__ = [
    "ARCH_DIR",
    "MemoryPlanError",
    "GIB",
    "DTYPE_BYTES",
    "arch_names",
    "load_arch_config",
    "build_meta",
    "param_shapes",
    "shard_numel",
    "tensor_bytes",
    "optimizer_state_bytes",
    "analytic_head_params",
    "ActivationProfile",
    "trace_activations",
    "NetworkMemory",
    "MemoryOptions",
    "MemoryPlan",
    "plan_memory",
    "format_plan",
    "main_memory",
]

"""The memory plan: how a run trades time for GPU memory to fit the memory it may use.

From the model's shape, the adapters, the tokens of the largest step, the precision and the optimizer, it
predicts the peak of each plan -- no checkpointing; the first ``k`` decoder layers checkpointed; all of them;
each of those with the FFF stacks recomputed in backward (in token chunks) -- and takes the fastest plan whose
peak fits the cap with a margin. It runs before any weight loads and needs no torch.

The model of the peak (bytes), per step of ``T`` tokens, fitted to GPU measurements (docs/benchmarks.md, "The
memory plan"):

* fixed: the quantised weights and the embeddings as the shape gives them, the trainable parameters with their
  gradients and optimizer states, and ``fixed_gib`` (CUDA workspaces, Unsloth's buffers);
* a decoder layer that keeps its activations: ``act`` bf16 vectors of ``hidden + intermediate`` per token; an FFF
  stack on it ``fff`` vectors of ``hidden`` per sub-layer per token, in the FFF dtype (a recomputed stack keeps
  only its input);
* a checkpointed layer keeps nothing on the GPU when Unsloth offloads its input to CPU memory (its LoRA path),
  else its input (one bf16 vector of ``hidden`` per token); in backward it rebuilds its activations;
* backward's working set on top of the layer it runs through: ``work`` bf16 vectors of ``hidden + intermediate``;
* the loss: Unsloth's chunked cross-entropy holds ``loss`` times one chunk of fp32 logits (at most
  ``LOSS_CHUNK_GIB``).

The peak is the larger of the end of the forward pass (everything kept + the loss) and the worst moment of the
backward walk from the last layer down (what the layers below keep + the working set of the layer it is in).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fff_lightning.kinds.fff import FFF_CHUNKS  # FFF stacks recomputed in backward run in this many token chunks

GIB = 1 << 30
#: The GiB of fp32 logits one chunk of Unsloth's chunked cross-entropy may hold (``UNSLOTH_LOGPROB_CHUNK_GB``,
#: which fff_lightning sets to this unless the environment does; Unsloth's own default is up to 2).
LOSS_CHUNK_GIB = 0.25
#: A plan fits when its predicted peak x (1 + FRAGMENTATION) + HEADROOM_GIB is within the cap.
FRAGMENTATION = 0.05
HEADROOM_GIB = 0.25
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw_8bit": 2, "paged_adamw_8bit": 0}  # paged: in CPU-backed memory
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Calibration:
    """Constants of the model above, fitted to measurements on one backend (see the module's docstring)."""

    fixed_gib: float
    act: float
    fff: float
    work: float
    rebuild: float
    rebuild_lora: float
    fff_kept: float
    loss: float
    offloaded: bool  # Unsloth's LoRA path offloads checkpointed layers' inputs to CPU memory
    #: A packed row attended one SDPA call per document (``packed_attention`` without the one-call path) keeps,
    #: per layer that keeps its activations, this many more bf16 vectors of ``hidden`` per token (the documents'
    #: outputs, and their join, saved for backward). Fitted to one cell: step 2 packed in 6,144-token rows, no
    #: checkpointing, measured 38.66 GiB on an H100 where the model without this term gives 35.40.
    segments: float = 2.17
    #: Relative step time: each checkpointed layer adds ``slow_layer``, each recomputed FFF stack ``slow_fff``.
    slow_layer: float = 0.0125
    slow_fff: float = 0.002
    source: str = ""


#: Unsloth on an H200 (random-weight Mistral-7B in nf4, 3 x 2048): docs/benchmarks.md, "The memory plan".
UNSLOTH = Calibration(fixed_gib=0.17, act=3.29, fff=1.9, work=2.36, rebuild=0.4, rebuild_lora=5.93, fff_kept=7.03,
                      loss=1.53, offloaded=True, slow_layer=0.0125, slow_fff=0.002,
                      source="Unsloth, H200, Mistral-7B nf4 (docs/benchmarks.md)")  # fmt: skip


def calibration(backend: str, dry_run: bool = False) -> Calibration | None:
    """The calibration of a backend (``auto`` resolved), or ``None``: only Unsloth's is measured. A dry run on a
    machine without a GPU plans ``auto`` as a GPU machine with Unsloth runs it."""
    if backend == "unsloth" or (dry_run and backend == "auto"):
        return UNSLOTH
    return None


@dataclass(frozen=True)
class Layout:
    """What the planner needs to know about a run, read from its config and the model's shape."""

    layers: int
    hidden: int
    intermediate: int
    vocab: int
    weight_bytes: int  # the base model's weights as loaded (4-bit or not)
    trainable: int
    optimizer: str
    fff_layers: frozenset = frozenset()
    fff_sublayers: int = 0
    fff_dtype_bytes: int = 4
    lora: bool = False
    packed_segments: bool = False  # packed rows attend one call per document (see Calibration.segments)


@dataclass(frozen=True)
class Plan:
    """One way to run: ``checkpointed`` first layers recompute (0: checkpointing off), FFF stacks recomputed."""

    checkpointed: int
    recompute_fff: bool
    peak_gib: float
    time: float  # relative to no checkpointing, no recomputation
    layers: int = 0
    offloaded: bool = False
    fits: bool = field(default=True, compare=False)

    def describe(self) -> str:
        if self.checkpointed == 0:
            what = "no checkpointing"
        elif self.checkpointed == self.layers:
            what = f"all {self.layers} layers checkpointed"
        else:
            what = f"first {self.checkpointed} of {self.layers} layers checkpointed"
        if self.checkpointed and self.offloaded:
            what += " (inputs offloaded to CPU)"
        if self.recompute_fff:
            what += ", FFF stacks recomputed"
        return what

    def needs_gib(self) -> float:
        """The smallest cap this plan fits."""
        return with_margin(self.peak_gib)


def with_margin(peak_gib: float) -> float:
    """A predicted peak with the plan's margin: the smallest cap a plan of that peak fits, and the most a run
    planned for it may measure."""
    return peak_gib * (1 + FRAGMENTATION) + HEADROOM_GIB


class NoPlanFits(Exception):
    """No plan fits the cap; ``smallest`` is the plan that needs the least."""

    def __init__(self, cap_gib: float, smallest: Plan):
        self.cap_gib, self.smallest = cap_gib, smallest
        super().__init__(f"nothing fits {cap_gib:.2f} GiB; the smallest plan needs {smallest.needs_gib():.2f}")


def weight_bytes(shape, load_in_4bit: bool) -> int:
    """The base model's weights on the GPU: decoder linears in nf4 with double quantisation (0.5 byte a weight and
    one byte of scale per 64), or bf16; embeddings, the LM head and norms in bf16."""
    h, i, n = shape.hidden_size, shape.intermediate_size, shape.num_hidden_layers
    heads = shape.num_attention_heads
    head_dim = getattr(shape, "head_dim", None) or h // heads
    kv = getattr(shape, "num_key_value_heads", None) or heads
    linear = n * (2 * h * heads * head_dim + 2 * h * kv * head_dim + 3 * h * i)
    embed = shape.vocab_size * h * (1 if getattr(shape, "tie_word_embeddings", False) else 2)
    norms = n * 2 * h + h
    per = 0.5 + 1 / 64 if load_in_4bit else 2
    return int(linear * per + 2 * (embed + norms))


def peak_bytes(layout: Layout, tokens: int, k: int, recompute_fff: bool, cal: Calibration) -> float:
    """The predicted peak of a step of ``tokens`` tokens with the first ``k`` layers checkpointed."""
    L = layout
    vec = 2 * (L.hidden + L.intermediate) * tokens  # one bf16 vector of hidden + intermediate per token
    act = cal.act * vec
    fff_full = cal.fff * L.fff_sublayers * L.hidden * L.fff_dtype_bytes * tokens
    fff_in = cal.fff_kept * 2 * L.hidden * tokens  # a recomputed stack keeps its input (and its output)
    ckpt_in = 0.0 if cal.offloaded and L.lora else 2 * L.hidden * tokens
    segments = cal.segments * 2 * L.hidden * tokens if L.packed_segments else 0.0
    fixed = L.weight_bytes + L.trainable * (4 + 4 + OPTIMIZER_STATE_BYTES[L.optimizer]) + cal.fixed_gib * GIB
    chunk_rows = max(1, int(LOSS_CHUNK_GIB * GIB / (4 * L.vocab)))
    loss = cal.loss * 4 * L.vocab * min(tokens, chunk_rows)

    kept, work = [], []
    for j in range(L.layers):
        fff = j in L.fff_layers
        if j < k:  # checkpointed: keeps its input (unless offloaded), rebuilds everything in backward
            kept.append(ckpt_in)
            rebuilt = (cal.rebuild + cal.rebuild_lora * L.lora) * vec + (
                fff_full / FFF_CHUNKS if recompute_fff else fff_full
            ) * fff
            work.append(ckpt_in + rebuilt + segments)
        else:
            keep = act + segments + ((fff_in if recompute_fff else fff_full) if fff else 0.0)
            kept.append(keep)
            work.append(keep + cal.work * vec + (fff_full / FFF_CHUNKS if recompute_fff and fff else 0.0))
    end_of_forward = sum(kept) + loss
    below, backward = sum(kept), 0.0
    for j in reversed(range(L.layers)):
        below -= kept[j]
        backward = max(backward, below + work[j])
    return fixed + max(end_of_forward, backward)


def plans(layout: Layout, tokens: int, cal: Calibration = UNSLOTH) -> list[Plan]:
    """Every plan, fastest first (ties: the one that checkpoints less)."""
    out = []
    options = (False, True) if layout.fff_layers else (False,)
    for recompute in options:
        for k in range(layout.layers + 1):
            time = 1 + cal.slow_layer * k + (cal.slow_fff * len(layout.fff_layers) if recompute else 0.0)
            peak = peak_bytes(layout, tokens, k, recompute, cal) / GIB
            out.append(Plan(k, recompute, peak, time, layout.layers, cal.offloaded and layout.lora))
    return sorted(out, key=lambda p: (p.time, p.checkpointed, p.recompute_fff))


def choose(layout: Layout, tokens: int, cap_gib: float, cal: Calibration = UNSLOTH) -> Plan:
    """The fastest plan that fits ``cap_gib``; :class:`NoPlanFits` when none does."""
    every = plans(layout, tokens, cal)
    for plan in every:
        if plan.needs_gib() <= cap_gib:
            return plan
    raise NoPlanFits(cap_gib, min(every, key=lambda p: p.peak_gib))


def largest_fitting_tokens(layout: Layout, cap_gib: float, tokens: int, cal: Calibration = UNSLOTH) -> int:
    """The most tokens per step (at most ``tokens``, a multiple of 64) that some plan fits in ``cap_gib``; 0: none."""

    def fits(t: int) -> bool:
        return any(p.needs_gib() <= cap_gib for p in plans(layout, t, cal))

    lo, hi = 0, tokens // 64  # in units of 64 tokens; fits(lo * 64) is assumed, fits(hi * 64) is not
    if not fits(64):
        return 0
    lo = 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid * 64) else (lo, mid)
    return lo * 64


def layout_of(
    shape, adapters, trainable: int, optimizer: str, load_in_4bit: bool, packed_segments: bool = False
) -> Layout:
    """The :class:`Layout` of a run: ``adapters`` is an :class:`~fff_lightning.spec.AdapterSpec`;
    ``packed_segments``: its packed rows attend one call per document."""
    fff = adapters.fff
    fff_layers = frozenset(fff.layer_indices(shape.num_hidden_layers)) if fff is not None else frozenset()
    return Layout(
        layers=shape.num_hidden_layers,
        hidden=shape.hidden_size,
        intermediate=shape.intermediate_size,
        vocab=shape.vocab_size,
        weight_bytes=weight_bytes(shape, load_in_4bit),
        trainable=trainable,
        optimizer=optimizer,
        fff_layers=fff_layers,
        fff_sublayers=fff.n_sublayers * len(fff.targets) if fff is not None else 0,  # stacks per layer
        fff_dtype_bytes=DTYPE_BYTES.get(fff.dtype, 4) if fff is not None else 4,
        lora=adapters.lora is not None,
        packed_segments=packed_segments,
    )

"""Benchmark harness: lora_fast vs diffusers vs the machine's floor, measured side by side in one run.

The floor of a fuse is max(bytes moved / measured copy bandwidth, FLOPs / measured fp32 matmul
rate): every targeted weight is read and written once and the factors read once; the low-rank
product costs 2·r FLOPs per weight element.

Each library is timed the same way on the same pipeline: the first fuse and unfuse after loading (one
sample each: they include one-time costs such as allocator growth and page faults, which a user pays once
per loaded adapter), then ``warmup`` untimed cycles, then the median of ``repeats`` timed cycles (what
every later fuse/unfuse costs). The headline ratio is the warm medians' ratio; the first calls are
reported beside it, never mixed into the median. Needs the ``diffusers`` extra for the models and the
comparison.
"""

from __future__ import annotations

import gc
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional
from unittest import mock

import torch
from torch import nn

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

#: default timed cycles per library and untimed warm-up cycles before them (see docs/cli.md, "bench")
REPEATS = 11
WARMUP = 2

#: name -> (model family, targets, rank)
CASES = {
    "sd15-attn-r4": ("sd15", "attn", 4),
    "sdxl-linear-r32": ("sdxl", "linear", 32),
    "sd3-attn-r16": ("sd3", "attn", 16),
}
#: per model family: the default (targets, rank) of ``lora-fast bench --model``
MODEL_DEFAULTS = {family: (targets, rank) for family, targets, rank in CASES.values()}

#: Flux.1 (``--model flux``): the transformer alone, at Flux.1-dev's width (inner dim 3072 = 24 heads x 128, MLP
#: 12288, the published config), with fewer blocks than the real model's 19 double + 38 single so it fits a small
#: machine. Targets: ``linear`` is every Linear of the double/single blocks (the modules sd-scripts names
#: ``double_blocks_N_*`` / ``single_blocks_N_*``, modulation included), ``attn`` the attention ones (img/txt qkv
#: and proj; a single block's attention and MLP share ``linear1``/``linear2``, both included).
MODEL_DEFAULTS["flux"] = ("linear", 16)
FLUX_BLOCKS = (2, 4)  # default (double, single) blocks
FLUX_FULL_BLOCKS = (19, 38)  # Flux.1-dev
FLUX_ATTN_MODULES = ("img_attn.qkv", "img_attn.proj", "txt_attn.qkv", "txt_attn.proj", "linear1", "linear2")
#: LoRA file layouts a case can be written in: diffusers/PEFT module names, or kohya sd-scripts (Flux only: fused
#: qkv / linear1 modules, which both libraries split into modules sharing one down matrix)
LORA_FORMATS = ("diffusers", "kohya")
#: case name -> {"lora_format": ..., "blocks": (double, single)} for cases that are not plain diffusers-file ones
CASE_OPTIONS: dict = {}
#: Flux drift check: the first rows of every targeted weight (a whole-weight copy would double the model's memory)
FLUX_DRIFT_ROWS = 512


def make_case(model: str, targets: Optional[str] = None, rank: Optional[int] = None, *,
              lora_format: str = "diffusers", blocks: Optional[tuple] = None) -> str:
    """The case name for a model family with optional targets/rank overrides, e.g. ``sd15-attn-r4``;
    registered in CASES so run()/run_case() accept it.

    ``lora_format``: the layout of the LoRA file both libraries load (``kohya`` for Flux only). ``blocks``: Flux's
    (double, single) block counts (default :data:`FLUX_BLOCKS`); the name then reads ``flux-d2s4-linear-r16`` (+
    ``-kohya``)."""
    if model not in MODEL_DEFAULTS:
        raise ValueError(f"unknown model {model!r} (expected one of {sorted(MODEL_DEFAULTS)})")
    default_targets, default_rank = MODEL_DEFAULTS[model]
    targets = targets or default_targets
    rank = rank or default_rank
    if targets not in ("attn", "linear"):
        raise ValueError(f"targets must be 'attn' or 'linear', got {targets!r}")
    if lora_format not in LORA_FORMATS:
        raise ValueError(f"lora_format must be one of {LORA_FORMATS}, got {lora_format!r}")
    if model != "flux":
        if lora_format != "diffusers":
            raise ValueError(f"--model {model}: the LoRA is written in the diffusers layout only (kohya: flux)")
        if blocks is not None:
            raise ValueError("blocks applies to --model flux only")
        name = f"{model}-{targets}-r{rank}"
        CASES.setdefault(name, (model, targets, int(rank)))
        return name
    double, single = FLUX_BLOCKS if blocks is None else (int(blocks[0]), int(blocks[1]))
    if double < 0 or single < 0 or double + single == 0:
        raise ValueError(f"Flux blocks must be >= 0 and not both 0, got {double},{single}")
    name = f"flux-d{double}s{single}-{targets}-r{rank}" + ("-kohya" if lora_format == "kohya" else "")
    CASES.setdefault(name, ("flux", targets, int(rank)))
    CASE_OPTIONS.setdefault(name, dict(lora_format=lora_format, blocks=(double, single)))
    return name


def median_time(fn: Callable[[], None], repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_copy_bandwidth(nbytes: int = 512 << 20, device="cpu", repeats: int = 5) -> float:
    """Bytes/s of a large tensor copy, read + write counted."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)

    def run():
        dst.copy_(src)
        sync()

    t = median_time(run, repeats)
    return 2 * nbytes / t


def measure_matmul_rate(n: int = 2048, device="cpu", repeats: int = 5) -> float:
    """FLOP/s of an n×n×n fp32 matmul (TF32 off)."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        def run():
            torch.mm(a, b)
            sync()

        t = median_time(run, repeats)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    return 2 * n**3 / t


def _is_target(name: str, module: nn.Module, targets: str) -> bool:
    if not isinstance(module, nn.Linear):
        return False
    if targets == "linear":
        return True
    # attention projections: diffusers to_q/k/v/to_out.0 (+ SD3's added projections), CLIP q/k/v/out_proj
    last = name.split(".")[-1]
    return last in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                    "q_proj", "k_proj", "v_proj", "out_proj") or name.endswith("to_out.0")


def make_adapter(components: dict[str, nn.Module], targets: str, rank: int, dtype=torch.float32, seed: int = 0,
                 text_encoders: bool = True):
    """A random diffusers-style adapter over the targeted modules (alpha = 2·rank, delta ≈ a few % of W)."""
    from .adapter import LoraAdapter, LoraLayer

    gen = torch.Generator().manual_seed(seed)
    layers = {}
    for comp, model in components.items():
        if comp.startswith("text_encoder") and (not text_encoders or targets == "attn" and comp != "text_encoder"):
            continue
        for name, module in model.named_modules():
            if not _is_target(name, module, targets):
                continue
            out_f, in_f = module.weight.shape
            down = (torch.randn(rank, in_f, generator=gen) / in_f**0.5).to(dtype)
            up = (torch.randn(out_f, rank, generator=gen) * 0.01).to(dtype)
            if comp.startswith("text_encoder") and not name.startswith("text_model."):
                name = "text_model." + name
            layers[f"{comp}.{name}"] = LoraLayer(down=down, up=up, alpha=2.0 * rank)
    return LoraAdapter(layers, "diffusers")


def _flux_block_modules(transformer: nn.Module, targets: str):
    """(BFL module name, [diffusers module paths]) of every targeted Flux block module of ``transformer``, in
    the table's order: one entry per original module (``double_blocks.0.img_attn.qkv`` -> to_q, to_k, to_v)."""
    from .formats.flux import FLUX_MODULES

    counts = {"double_blocks": len(transformer.transformer_blocks),
              "single_blocks": len(transformer.single_transformer_blocks)}
    out = []
    for m in FLUX_MODULES:
        kind, _, rest = m.bfl.partition(".{i}.")
        if kind not in counts or (targets == "attn" and rest not in FLUX_ATTN_MODULES):
            continue
        for i in range(counts[kind]):
            out.append((m.bfl.format(i=i), [p.format(i=i) for p, _ in m.targets]))
    return out


def make_flux_adapter(transformer: nn.Module, targets: str, rank: int, dtype=torch.float32, seed: int = 0):
    """A random Flux LoRA over the transformer's blocks in the form of an sd-scripts file: one down/up pair per
    original (BFL) module, fused projections (img/txt qkv, single-block linear1) whole, alpha = 2·rank (scale 2,
    delta a few % of W as in :func:`make_adapter`). Returned as lora_fast reads that kohya file: diffusers module
    keys, the parts of a fused projection sharing one down tensor. ``adapter.save(path, format="kohya")`` writes the
    sd-scripts file back bit for bit; ``format="diffusers"`` the same deltas under diffusers/PEFT names."""
    from .formats.flux import read_flux
    from .formats.fused import kohya_name

    gen = torch.Generator().manual_seed(seed)
    mods = dict(transformer.named_modules())
    sd = {}
    for bfl, paths in _flux_block_modules(transformer, targets):
        rows = sum(mods[p].out_features for p in paths)
        in_f = mods[paths[0]].in_features
        name = kohya_name(bfl)
        sd[f"{name}.lora_down.weight"] = (torch.randn(rank, in_f, generator=gen) / in_f**0.5).to(dtype)
        sd[f"{name}.lora_up.weight"] = (torch.randn(rows, rank, generator=gen) * 0.01).to(dtype)
        sd[f"{name}.alpha"] = torch.tensor(2.0 * rank, dtype=dtype)
    if not sd:
        raise ValueError("this Flux transformer has no block to put a LoRA on")
    return read_flux(sd, "kohya", source="bench")


def flux_model_info(transformer: nn.Module, targets: str) -> dict:
    """How the (reduced) Flux transformer compares with the real one at the same widths (19 double + 38 single
    blocks, built on the meta device): blocks, parameters and targeted weights, and their fractions."""
    full_cfg = {k: v for k, v in dict(transformer.config).items() if not k.startswith("_")}
    full_cfg.update(num_layers=FLUX_FULL_BLOCKS[0], num_single_layers=FLUX_FULL_BLOCKS[1])
    with torch.device("meta"):
        full = type(transformer)(**full_cfg)

    def targeted(model):
        mods = dict(model.named_modules())
        return sum(mods[p].weight.numel() for _, paths in _flux_block_modules(model, targets) for p in paths)

    params = sum(p.numel() for p in transformer.parameters())
    full_params = sum(p.numel() for p in full.parameters())
    tw, full_tw = targeted(transformer), targeted(full)
    return dict(
        double_blocks=len(transformer.transformer_blocks), single_blocks=len(transformer.single_transformer_blocks),
        full_double_blocks=FLUX_FULL_BLOCKS[0], full_single_blocks=FLUX_FULL_BLOCKS[1],
        inner_dim=int(transformer.inner_dim), params=params, full_params=full_params,
        param_fraction=params / full_params, targeted_weights=tw, full_targeted_weights=full_tw,
        targeted_fraction=tw / full_tw, text_encoders=False,
    )


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def _flux_note(info: dict) -> str:
    width = "Flux.1-dev width" if info["inner_dim"] == 3072 else "test width"
    return (f"Flux transformer only (no T5/CLIP), {width} (inner dim {info['inner_dim']}), "
            f"{info['double_blocks']} of {info['full_double_blocks']} double and {info['single_blocks']} of "
            f"{info['full_single_blocks']} single blocks: {100 * info['param_fraction']:.1f}% of the parameters of "
            f"the {info['full_double_blocks']}+{info['full_single_blocks']}-block transformer at this width "
            f"({_count(info['full_params'])}), {100 * info['targeted_fraction']:.1f}% of the weights this LoRA "
            f"targets on it ({_count(info['full_targeted_weights'])})")


def _flux_pipeline(size: str, dtype, device: str, blocks: tuple):
    """A FluxPipeline around a Flux transformer with ``blocks`` = (double, single) blocks: Flux.1-dev widths at
    ``size="full"`` (built on meta, then given random weights), the tiny test widths otherwise."""
    from .models import build_flux_pipeline_around, build_flux_transformer, materialize

    double, single = blocks
    if size == "tiny":
        t = build_flux_transformer("tiny", dtype=dtype, num_layers=double, num_single_layers=single)
        t = t.to(device) if device != "cpu" else t
    else:
        t = materialize(build_flux_transformer("full", device="meta", num_layers=double, num_single_layers=single),
                        dtype=dtype, device=device)
    return build_flux_pipeline_around(t, dtype=dtype, device=device)


@dataclass
class CaseResult:
    case: str
    dtype: str
    modules: int
    params: int
    floor_s: float
    lora_fast: dict = field(default_factory=dict)
    diffusers: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    lora_format: str = "diffusers"
    model: dict = field(default_factory=dict)  # Flux: blocks and fractions of the real model (flux_model_info)


def _changed_bits(tensors, originals) -> int:
    bits = {4: torch.int32, 2: torch.int16}
    return sum(int((a.view(bits[a.element_size()]) != b.view(bits[b.element_size()])).sum())
               for a, b in zip(tensors, originals))


def _targeted(components, adapter):
    from .adapter import split_component
    from .targets import resolve_module

    out = []
    for key in adapter.layers:
        comp, path = split_component(key)
        out.append(resolve_module(components[comp], path).weight)
    return out


def _synchronizer(device) -> Callable[[], None]:
    if str(device).startswith("cuda"):
        return torch.cuda.synchronize
    return lambda: None


def _timed(fn: Callable[[], None], sync: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def _summary(times: list) -> dict:
    """median and quartiles of a list of seconds (quartiles equal the median for fewer than 2 samples)."""
    med = statistics.median(times)
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else (med, med, med)
    return dict(median=med, q1=q1, q3=q3)


def time_cycles(fuse: Callable[[], None], unfuse: Callable[[], None], *, repeats: int, warmup: int,
                sync: Callable[[], None] = lambda: None, after_first_fuse: Optional[Callable[[], None]] = None,
                after_first_cycle: Optional[Callable[[], None]] = None) -> dict:
    """Time one library's fuse/unfuse the way the report presents it.

    The first fuse and unfuse (after loading) are timed alone: they carry one-time costs. Then ``warmup`` untimed
    cycles, then ``repeats`` timed cycles whose medians are the warm figures. The garbage collector is off while
    timing (as in timeit). ``after_first_fuse`` / ``after_first_cycle`` run untimed (e.g. to measure a record or
    count changed bits)."""
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        first_fuse = _timed(fuse, sync)
        if after_first_fuse is not None:
            after_first_fuse()
        first_unfuse = _timed(unfuse, sync)
        if after_first_cycle is not None:
            after_first_cycle()
        for _ in range(warmup):
            fuse()
            unfuse()
        sync()
        fuse_times, unfuse_times = [], []
        for _ in range(repeats):
            fuse_times.append(_timed(fuse, sync))
            unfuse_times.append(_timed(unfuse, sync))
    finally:
        if was_enabled:
            gc.enable()
    f, u = _summary(fuse_times), _summary(unfuse_times)
    return dict(
        first_fuse_s=first_fuse, first_unfuse_s=first_unfuse,
        fuse_s=f["median"], unfuse_s=u["median"],
        fuse_quartiles_s=[f["q1"], f["q3"]], unfuse_quartiles_s=[u["q1"], u["q3"]],
        fuse_times_s=fuse_times, unfuse_times_s=unfuse_times, warmup_cycles=warmup,
    )


def run_case(case: str, dtype_name: str, *, floor: dict, repeats: int = REPEATS, warmup: int = WARMUP,
             compare_diffusers: bool = True, size: str = "full", drift_sample: int = 64,
             log: Callable[[str], None] = print, device: str = "cpu") -> CaseResult:
    """Time one case (a CASES name) in one dtype on ``device``: lora_fast load/fuse/unfuse, then diffusers'.

    Both libraries get the same protocol (see :func:`time_cycles`) on the same freshly built pipeline."""
    import lora_fast

    from . import engine
    from .models import build_pipeline, materialize

    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    family, targets, rank = CASES[case]
    opts = CASE_OPTIONS.get(case, {})
    lora_format = opts.get("lora_format", "diffusers")
    dtype = DTYPES[dtype_name]
    sync = _synchronizer(device)
    notes, model_info = [], {}
    if family == "flux":
        pipe = _flux_pipeline(size, dtype, device, opts.get("blocks", FLUX_BLOCKS))
        comps = {"transformer": pipe.transformer}
        adapter = make_flux_adapter(pipe.transformer, targets, rank, dtype=dtype)
        model_info = flux_model_info(pipe.transformer, targets)
        notes.append(_flux_note(model_info))
    else:
        if size == "tiny":
            pipe = build_pipeline(family, "tiny", dtype=dtype, device="cpu")
            if device != "cpu":
                pipe.to(device)
        else:
            pipe = build_pipeline(family, "full", dtype=dtype, device="meta")
        comps = {k: v for k, v in pipe.components.items() if isinstance(v, nn.Module) and k != "vae"}
        if size != "tiny":
            for i, m in enumerate(comps.values()):
                materialize(m, dtype=dtype, seed=i, device=device)
            pipe.vae = materialize(pipe.vae, dtype=dtype, device=device)
        adapter = make_adapter(comps, targets, rank, dtype=dtype)
    weights = _targeted(comps, adapter)
    n_params = sum(w.numel() for w in weights)
    elt = torch.finfo(dtype).bits // 8
    # the factors are read once: a down matrix shared by the parts of a fused projection counts once
    factors = {id(t): t for l in adapter.layers.values() for t in (l.down, l.up)}
    nbytes = 2 * n_params * elt + sum(t.numel() for t in factors.values()) * elt
    flops = 2 * rank * n_params
    floor_s = max(nbytes / floor["copy_bytes_per_s"], flops / floor["matmul_flops_per_s"])
    res = CaseResult(case, dtype_name, len(adapter.layers), n_params, floor_s, notes=notes, lora_format=lora_format,
                     model=model_info)
    log(f"[{case} {dtype_name}] {len(adapter.layers)} modules, {n_params / 1e6:.0f} M params, {lora_format} file, "
        f"floor {floor_s * 1e3:.1f} ms")
    for note in notes:
        log(f"  {note}")
    if (compare_diffusers and family == "flux" and lora_format == "kohya" and model_info["single_blocks"]
            and model_info["inner_dim"] != 3072):
        # diffusers' kohya Flux converter splits linear1 with Flux.1's widths written in (3072 x 3 + 12288)
        compare_diffusers = False
        res.notes.append("diffusers not run: its kohya Flux converter splits single_blocks linear1 at Flux.1's "
                         f"widths only (inner dim 3072; this model's is {model_info['inner_dim']})")
        log(f"  {res.notes[-1]}")

    def fmt(d: dict) -> str:
        return (f"first fuse {d['first_fuse_s'] * 1e3:.1f} ms, unfuse {d['first_unfuse_s'] * 1e3:.1f} ms; warm median "
                f"fuse {d['fuse_s'] * 1e3:.1f} ms, unfuse {d['unfuse_s'] * 1e3:.1f} ms")

    with tempfile.TemporaryDirectory() as tmp:
        name = "pytorch_lora_weights.safetensors" if lora_format == "diffusers" else f"lora_{lora_format}.safetensors"
        path = os.path.join(tmp, name)
        adapter.save(path, format=lora_format)
        del adapter
        # Flux (every block weight targeted): the first rows of every weight; otherwise the first weights whole
        sample = [w[:FLUX_DRIFT_ROWS] for w in weights] if family == "flux" else weights[:drift_sample]
        pristine = [w.detach().clone() for w in sample]

        # lora_fast: load (file -> registered), first fuse/unfuse, warm cycles; then fuse-on-load end to end
        gc.collect()
        t_load = _timed(lambda: lora_fast.load_lora_weights(pipe, path, adapter_name="bench"), sync)
        rec = []
        lf = time_cycles(lambda: lora_fast.fuse_lora(pipe), lambda: lora_fast.unfuse_lora(pipe), repeats=repeats,
                         warmup=warmup, sync=sync, after_first_fuse=lambda: rec.append(engine.fused_record_bytes(pipe)))
        changed = _changed_bits(sample, pristine)
        # the other fuse paths, warm: safe_fusing (a repeat: one writing pass that checks), and a fuse that finds
        # no cached positions (counting pass, one host read, writing pass: what a new adapter or scale costs and
        # what fuse-on-load overlaps with reading the file)
        # (time_cycles' first, separately timed cycle warms each path up; its warm median is the figure)
        unfuse = lambda: lora_fast.unfuse_lora(pipe)  # noqa: E731
        safe = time_cycles(lambda: lora_fast.fuse_lora(pipe, safe_fusing=True), unfuse, repeats=repeats, warmup=0,
                           sync=sync)["fuse_s"]
        with mock.patch.dict(os.environ, {"LORA_FAST_FUSE_CACHE": "0"}):
            uncached = time_cycles(lambda: lora_fast.fuse_lora(pipe), unfuse, repeats=repeats, warmup=0,
                                   sync=sync)["fuse_s"]
        lora_fast.unload_lora_weights(pipe)
        t_e2e = _timed(lambda: lora_fast.load_lora_weights(pipe, path, adapter_name="bench2", fuse=True), sync)
        lora_fast.unfuse_lora(pipe)
        lora_fast.unload_lora_weights(pipe)
        res.lora_fast = dict(
            load_s=t_load, **lf, load_fuse_s=t_load + lf["first_fuse_s"], fuse_on_load_s=t_e2e,
            safe_fuse_s=safe, uncached_fuse_s=uncached,
            record_bytes=rec[0], record_fraction_of_weight_bytes=rec[0] / (n_params * elt),
            changed_elements_after_cycles=changed, sample_elements=sum(w.numel() for w in sample),
        )
        log(f"  lora_fast  load {t_load:.3f}s; {fmt(lf)}; load(fuse=True) {t_e2e:.3f}s; record "
            f"{rec[0] / 2**20:.1f} MiB ({100 * res.lora_fast['record_fraction_of_weight_bytes']:.1f}% of fused weight "
            f"bytes); changed bits {changed}")
        with torch.no_grad():
            for w, p in zip(sample, pristine):
                w.copy_(p)  # defensive: diffusers starts from pristine weights even if the above failed

        if compare_diffusers:
            gc.collect()
            t_dload = _timed(lambda: pipe.load_lora_weights(path, adapter_name="bench"), sync)
            d_changed = []
            df = time_cycles(pipe.fuse_lora, pipe.unfuse_lora, repeats=repeats, warmup=warmup, sync=sync,
                             after_first_cycle=lambda: d_changed.append(_changed_bits(sample, pristine)))
            pipe.unload_lora_weights()
            res.diffusers = dict(load_s=t_dload, **df, load_fuse_s=t_dload + df["first_fuse_s"],
                                 changed_elements_after_one_cycle=d_changed[0])
            log(f"  diffusers  load {t_dload:.3f}s; {fmt(df)}; changed after 1 cycle "
                f"{100 * d_changed[0] / res.lora_fast['sample_elements']:.2f}% of sampled elements")
    del pipe, comps, weights, sample, pristine
    gc.collect()
    return res


def _load_average() -> Optional[float]:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def run(cases=("sd15-attn-r4",), dtypes=("fp32", "fp16", "bf16"), *, repeats: int = REPEATS, warmup: int = WARMUP,
        compare_diffusers: bool = True, size: str = "full", log: Callable[[str], None] = print,
        device: str = "cpu", threads: Optional[int] = None) -> dict:
    """Run the cases and return a JSON-able report (machine, floor, per-case results).

    The machine's 1-minute load average is recorded before and after: other work running at the same time slows
    both libraries by different amounts, so a high value means the ratios may not reproduce. ``threads`` sets
    torch's CPU thread count for the run (both libraries use it; lora_fast's CPU kernels follow
    ``torch.get_num_threads()``); None keeps torch's default."""
    prev_threads = torch.get_num_threads()
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    try:
        return _run(cases, dtypes, repeats=repeats, warmup=warmup, compare_diffusers=compare_diffusers, size=size,
                    log=log, device=device)
    finally:
        torch.set_num_threads(prev_threads)


def _run(cases, dtypes, *, repeats, warmup, compare_diffusers, size, log, device) -> dict:
    import platform

    load_before = _load_average()
    floor_bytes = (64 << 20) if size == "tiny" else (512 << 20)
    floor_n = 512 if size == "tiny" else 2048
    floor = dict(copy_bytes_per_s=measure_copy_bandwidth(floor_bytes, device=device, repeats=9),
                 matmul_flops_per_s=measure_matmul_rate(floor_n, device=device, repeats=9))
    log(f"floor: copy {floor['copy_bytes_per_s'] / 1e9:.1f} GB/s (read+write), fp32 matmul "
        f"{floor['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s, {torch.get_num_threads()} threads; load average "
        + ("unknown" if load_before is None else f"{load_before:.2f} on {_cpus()} CPUs"))
    results = []
    for case in cases:
        for dt in dtypes:
            results.append(asdict(run_case(case, dt, floor=floor, repeats=repeats, warmup=warmup,
                                           compare_diffusers=compare_diffusers, size=size, log=log, device=device)))
    machine = dict(platform=platform.platform(), processor=_cpu_name(), cpu_count=os.cpu_count(), cpus_usable=_cpus(),
                   threads=torch.get_num_threads(), torch=torch.__version__, device=device,
                   load_average_before=load_before, load_average_after=_load_average())
    if str(device).startswith("cuda"):
        machine["gpu"] = torch.cuda.get_device_name(device)
    try:
        import diffusers

        machine["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    return dict(machine=machine, size=size, repeats=repeats, warmup=warmup, floor=floor, results=results)


def _cpu_name() -> str:
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ------------------------------------------------------------------------------------------------ reporting


def _ms(x) -> str:
    return "-" if x is None else f"{x * 1e3:.1f}"


def _ratio(a, b, digits: int = 1) -> str:
    return "-" if (a is None or b is None or b == 0) else f"{a / b:.{digits}f}x"


def _faster(slow, fast) -> str:
    """'3.9x faster' (slow / fast), '-' when either is missing."""
    return "-" if (slow is None or fast is None or fast == 0) else f"{slow / fast:.1f}x faster"


def timing_spread(result: dict) -> Optional[float]:
    """The largest interquartile range / median among a result's warm series (lora_fast and diffusers fuse and
    unfuse): how steady the warm timings were. None when no quartiles were recorded."""
    out = None
    for lib in ("lora_fast", "diffusers"):
        d = result.get(lib) or {}
        for what in ("fuse", "unfuse"):
            q, med = d.get(f"{what}_quartiles_s"), d.get(f"{what}_s")
            if q and med:
                out = max(out or 0.0, (q[1] - q[0]) / med)
    return out


#: above this interquartile range / median, or a load average above BUSY_LOAD per usable CPU, the table says the
#: machine was busy and the ratios may not reproduce
NOISY_SPREAD = 0.2
BUSY_LOAD = 0.25


def headline(result: dict) -> Optional[float]:
    """The figure to compare: diffusers' warm median fuse time / lora_fast's (None without diffusers)."""
    lf, df = result.get("lora_fast") or {}, result.get("diffusers") or {}
    if not df.get("fuse_s") or not lf.get("fuse_s"):
        return None
    return df["fuse_s"] / lf["fuse_s"]


def _table(head: list, rows: list, left: int = 2) -> list:
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    out = ["  ".join(h.rjust(w) if i >= left else h.ljust(w) for i, (h, w) in enumerate(zip(head, widths)))]
    out.append("  ".join("-" * w for w in widths))
    for row in rows:
        out.append("  ".join(c.rjust(w) if i >= left else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
    return out


def format_table(report: dict) -> str:
    """What ``lora-fast bench`` prints: warm medians (the figures to compare), first calls after loading, exactness."""
    results = report["results"]
    repeats, warmup = report.get("repeats", "?"), report.get("warmup", 0)
    lines = [f"Warm: median of {repeats} timed fuse/unfuse cycles per library after {warmup} untimed warm-up "
             "cycles. This is what every fuse/unfuse after the first costs; compare these."]
    rows = []
    for r in results:
        lf, df = r["lora_fast"], r.get("diffusers") or {}
        spread = timing_spread(r)
        rows.append([
            r["case"], r["dtype"], str(r["modules"]), _ms(r["floor_s"]), _ms(lf.get("fuse_s")), _ms(lf.get("unfuse_s")),
            _ms(df.get("fuse_s")), _ms(df.get("unfuse_s")), _faster(df.get("fuse_s"), lf.get("fuse_s")),
            _faster(df.get("unfuse_s"), lf.get("unfuse_s")), _ratio(lf.get("fuse_s"), r["floor_s"]),
            "-" if spread is None else f"{100 * spread:.0f}%",
        ])
    lines += _table(["case", "dtype", "modules", "floor", "lora_fast fuse", "unfuse", "diffusers fuse", "unfuse",
                     "fuse speed-up", "unfuse speed-up", "fuse / floor", "spread"], rows)

    lines += ["", "First call after loading (one sample each, one-time costs included; load+fuse = load_lora_weights "
                  "+ the first fuse_lora)."]
    rows = []
    for r in results:
        lf, df = r["lora_fast"], r.get("diffusers") or {}
        rows.append([
            r["case"], r["dtype"], _ms(lf.get("load_s")), _ms(lf.get("first_fuse_s")), _ms(lf.get("first_unfuse_s")),
            _ms(lf.get("load_fuse_s")), _ms(df.get("load_s")), _ms(df.get("first_fuse_s")),
            _ms(df.get("first_unfuse_s")), _ms(df.get("load_fuse_s")),
            _faster(df.get("first_fuse_s"), lf.get("first_fuse_s")), _faster(df.get("load_fuse_s"), lf.get("load_fuse_s")),
        ])
    lines += _table(["case", "dtype", "lora_fast load", "fuse", "unfuse", "load+fuse", "diffusers load", "fuse",
                     "unfuse", "load+fuse", "fuse speed-up", "load+fuse speed-up"], rows)

    rows = []
    for r in results:
        lf = r["lora_fast"]
        if lf.get("safe_fuse_s") is None:
            continue
        overlap = max(lf["load_s"], lf["uncached_fuse_s"])
        rows.append([
            r["case"], r["dtype"], _ms(lf.get("fuse_s")), _ratio(lf.get("unfuse_s"), lf.get("fuse_s"), 2),
            _ms(lf["safe_fuse_s"]), _ratio(lf["safe_fuse_s"], lf.get("fuse_s"), 2), _ms(lf["uncached_fuse_s"]),
            _ms(lf["load_s"]), _ms(lf["fuse_on_load_s"]), _ratio(lf["fuse_on_load_s"], overlap, 2),
        ])
    if rows:
        lines += ["", "lora_fast's fuse paths, warm medians: a repeated fuse (cached record positions), unfuse, "
                      "safe_fusing, a fuse without cached positions (a new adapter or scale); fuse-on-load "
                      "(load_lora_weights(fuse=True), one sample) against the longer of reading and fusing."]
        lines += _table(["case", "dtype", "fuse", "unfuse / fuse", "safe fuse", "safe / fuse", "uncached fuse",
                         "load", "fuse-on-load", "on-load / max(load, uncached)"], rows)

    lines += ["", "Exactness: share of sampled weight elements that differ from the original after fuse+unfuse."]
    rows = []
    for r in results:
        lf, df = r["lora_fast"], r.get("diffusers") or {}
        sample = lf.get("sample_elements") or 1
        d_changed = df.get("changed_elements_after_one_cycle")
        rows.append([
            r["case"], r["dtype"],
            ("0 (bit-exact)" if lf.get("changed_elements_after_cycles") == 0
             else f"{100 * lf['changed_elements_after_cycles'] / sample:.2f}%"),
            "-" if d_changed is None else f"{100 * d_changed / sample:.2f}%",
        ])
    lines += _table(["case", "dtype", "lora_fast (after every cycle)", "diffusers (after one cycle)"], rows)

    notes = list(dict.fromkeys(f"{r['case']}: {n}" for r in results for n in r.get("notes") or ()))
    if notes:
        lines += ["", "Notes:"] + [f"  {n}" for n in notes]

    heads = [(r, headline(r)) for r in results]
    if any(h is not None for _, h in heads):
        lines += ["", "Headline, lora_fast's warm fuse speed-up over diffusers: " + ", ".join(
            f"{h:.1f}x ({r['case']} {r['dtype']})" for r, h in heads if h is not None) + "."]

    m, fl = report["machine"], report["floor"]
    lines.append("")
    lines.append(f"Times in ms. floor = max(bytes moved / {fl['copy_bytes_per_s'] / 1e9:.1f} GB/s copy, FLOPs / "
                 f"{fl['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s matmul), measured in this run. spread = the largest "
                 "interquartile range / median of the four warm series.")
    lines.append(f"machine: {m.get('processor')}, {m.get('threads')} threads, {m.get('device')}, torch {m.get('torch')}"
                 + (f", diffusers {m['diffusers']}" if m.get("diffusers") else "")
                 + (f", {m['gpu']}" if m.get("gpu") else ""))
    before, after = m.get("load_average_before"), m.get("load_average_after")
    cpus = m.get("cpus_usable") or m.get("cpu_count") or 1
    if before is not None:
        lines.append(f"load average (1 min): {before:.2f} before, {after:.2f} after, on {cpus} CPUs")
    busy = before is not None and before > BUSY_LOAD * cpus
    noisy = [f"{r['case']} {r['dtype']}" for r in results if (timing_spread(r) or 0) > NOISY_SPREAD]
    if busy or noisy:
        why = []
        if busy:
            why.append(f"other work was running (load average {before:.2f} on {cpus} CPUs)")
        if noisy:
            why.append(f"warm times varied by more than {100 * NOISY_SPREAD:.0f}% ({', '.join(noisy)})")
        lines.append("warning: " + " and ".join(why) + ": contention slows the two libraries by different amounts, "
                     "so these ratios may not reproduce; rerun on an idle machine, or with --threads 1 for single-thread figures, "
                     "which contention distorts much less")
    return "\n".join(lines)


def write_chart(report: dict, path: str) -> bool:
    """A PNG bar chart of the report (False when matplotlib is not installed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    results = report["results"]
    labels = [f"{r['case']}\n{r['dtype']}" for r in results]

    def get(r, lib, key):
        return (r.get(lib) or {}).get(key)

    # (label, library, warm key, first-call key, color); bars: warm medians with interquartile whiskers
    series = [
        ("floor", None, "floor_s", None, "#999999"),
        ("lora_fast fuse", "lora_fast", "fuse", "first_fuse_s", "#1f77b4"),
        ("lora_fast unfuse", "lora_fast", "unfuse", "first_unfuse_s", "#6baed6"),
        ("diffusers fuse", "diffusers", "fuse", "first_fuse_s", "#d62728"),
        ("diffusers unfuse", "diffusers", "unfuse", "first_unfuse_s", "#fc9272"),
    ]
    series = [s for s in series if s[1] is None or any(get(r, s[1], s[2] + "_s") is not None for r in results)]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(4 + 2.6 * len(results), 5.4),
                                  gridspec_kw={"width_ratios": [3, 1.4]})
    width = 0.8 / len(series)
    all_values = []
    first_labelled = False
    for k, (name, lib, key, first_key, color) in enumerate(series):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(results))]
        if lib is None:
            values = [r[key] for r in results]
            quart = [None] * len(results)
            firsts = [None] * len(results)
        else:
            values = [get(r, lib, key + "_s") for r in results]
            quart = [get(r, lib, key + "_quartiles_s") for r in results]
            firsts = [get(r, lib, first_key) for r in results]
        ys = [(v or 0) * 1e3 for v in values]
        lo = [max(0.0, (v - q[0]) * 1e3) if (v and q) else 0 for v, q in zip(values, quart)]
        hi = [max(0.0, (q[1] - v) * 1e3) if (v and q) else 0 for v, q in zip(values, quart)]
        bars = ax.bar(xs, ys, width, label=name + ("" if lib is None else " (warm median)"), color=color,
                      yerr=[lo, hi] if lib is not None else None, error_kw=dict(lw=0.8, capsize=2))
        all_values += [v for v in values if v]
        for b, v in zip(bars, values):
            if v is not None:
                ax.annotate(f"{v * 1e3:.0f}" if v >= 0.01 else f"{v * 1e3:.2g}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
                            va="bottom", fontsize=7)
        pts = [(x, f * 1e3) for x, f in zip(xs, firsts) if f]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker="v", s=18, facecolors="none",
                       edgecolors="black", linewidths=0.8, zorder=3,
                       label=None if first_labelled else "first call after load")
            first_labelled = True
            all_values += [f for f in firsts if f]
    ax.set_yscale("log")
    ax.set_ylim(bottom=min(all_values) * 1e3 / 3)
    ax.set_ylabel("ms (log scale, lower is better)")
    ax.set_xticks(range(len(results)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_title(f"fuse / unfuse: median of {report.get('repeats', '?')} warm cycles (bars, interquartile "
                 "whiskers)\nand the first call after loading (triangles)", fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, frameon=False)
    sample = [r["lora_fast"].get("sample_elements") or 1 for r in results]
    lf_changed = [100 * r["lora_fast"].get("changed_elements_after_cycles", 0) / n for r, n in zip(results, sample)]
    d_changed = [100 * ((r.get("diffusers") or {}).get("changed_elements_after_one_cycle") or 0) / n
                 for r, n in zip(results, sample)]
    xs = range(len(results))
    for shift, values, name, color in ((-0.2, lf_changed, "lora_fast", "#1f77b4"), (0.2, d_changed, "diffusers", "#d62728")):
        bars = ax2.bar([x + shift for x in xs], values, 0.4, label=name, color=color)
        for b, v in zip(bars, values):
            ax2.annotate("0 (exact)" if v == 0 and name == "lora_fast" else f"{v:.1f}%",
                         (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=7)
    ax2.set_xticks(list(xs))
    ax2.set_xticklabels(labels, fontsize=8)
    ax2.set_ylabel("% of weights changed after fuse+unfuse")
    ax2.set_title("unfuse exactness")
    ax2.legend(fontsize=8)
    m = report["machine"]
    load = m.get("load_average_before")
    fig.suptitle(f"lora_fast bench: {m.get('processor')}, {m.get('threads')} threads, {m.get('device')}"
                 + ("" if load is None else f", load average {load:.2f} at start"), fontsize=9)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return True


def write_report(report: dict, out_dir: str) -> list[str]:
    """bench.json (+ bench.png when matplotlib is installed) in ``out_dir``; returns the paths written."""
    import json

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "bench.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
    written = [path]
    png = os.path.join(out_dir, "bench.png")
    if write_chart(report, png):
        written.append(png)
    return written

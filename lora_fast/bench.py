"""Benchmark harness: lora_fast vs diffusers vs the machine's floor, measured side by side in one run.

The floor of a fuse is max(bytes moved / measured copy bandwidth, FLOPs / measured fp32 matmul
rate): every targeted weight is read and written once and the factors read once; the low-rank
product costs 2·r FLOPs per weight element. Times are medians of warm repeats.
Needs the ``diffusers`` extra for the models and the comparison.
"""

from __future__ import annotations

import gc
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

#: name -> (model family, targets, rank)
CASES = {
    "sd15-attn-r4": ("sd15", "attn", 4),
    "sdxl-linear-r32": ("sdxl", "linear", 32),
    "sd3-attn-r16": ("sd3", "attn", 16),
}
#: per model family: the default (targets, rank) of ``lora-fast bench --model``
MODEL_DEFAULTS = {family: (targets, rank) for family, targets, rank in CASES.values()}


def make_case(model: str, targets: Optional[str] = None, rank: Optional[int] = None) -> str:
    """The case name for a model family with optional targets/rank overrides, e.g. ``sd15-attn-r4``;
    registered in CASES so run()/run_case() accept it."""
    default_targets, default_rank = MODEL_DEFAULTS[model]
    targets = targets or default_targets
    rank = rank or default_rank
    if targets not in ("attn", "linear"):
        raise ValueError(f"targets must be 'attn' or 'linear', got {targets!r}")
    name = f"{model}-{targets}-r{rank}"
    CASES.setdefault(name, (model, targets, int(rank)))
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


def run_case(case: str, dtype_name: str, *, floor: dict, repeats: int = 3, compare_diffusers: bool = True,
             size: str = "full", drift_sample: int = 64, log: Callable[[str], None] = print,
             device: str = "cpu") -> CaseResult:
    """Time one case (a CASES name) in one dtype on ``device``: lora_fast load/fuse/unfuse, then diffusers'."""
    import lora_fast

    from . import engine
    from .models import build_pipeline, materialize

    family, targets, rank = CASES[case]
    dtype = DTYPES[dtype_name]
    sync = _synchronizer(device)
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
    nbytes = 2 * n_params * elt + sum(l.down.numel() + l.up.numel() for l in adapter.layers.values()) * elt
    flops = 2 * rank * n_params
    floor_s = max(nbytes / floor["copy_bytes_per_s"], flops / floor["matmul_flops_per_s"])
    res = CaseResult(case, dtype_name, len(adapter.layers), n_params, floor_s)
    log(f"[{case} {dtype_name}] {len(adapter.layers)} modules, {n_params / 1e6:.0f} M params, floor {floor_s * 1e3:.1f} ms")

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "pytorch_lora_weights.safetensors")
        adapter.save(path, format="diffusers")
        sample = weights[:drift_sample]
        pristine = [w.detach().clone() for w in sample]

        # lora_fast: load (file -> registered), fuse, unfuse, load+fuse end to end
        t0 = time.perf_counter()
        lora_fast.load_lora_weights(pipe, path, adapter_name="bench")
        t_load = time.perf_counter() - t0
        lora_fast.fuse_lora(pipe)  # warm-up cycle
        lora_fast.unfuse_lora(pipe)
        sync()
        fuse_times, unfuse_times = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            lora_fast.fuse_lora(pipe)
            sync()
            fuse_times.append(time.perf_counter() - t0)
            rec = engine.fused_record_bytes(pipe)
            t0 = time.perf_counter()
            lora_fast.unfuse_lora(pipe)
            sync()
            unfuse_times.append(time.perf_counter() - t0)
        changed = _changed_bits(sample, pristine)
        lora_fast.unload_lora_weights(pipe)
        t0 = time.perf_counter()
        lora_fast.load_lora_weights(pipe, path, adapter_name="bench2", fuse=True)
        sync()
        t_e2e = time.perf_counter() - t0
        lora_fast.unfuse_lora(pipe)
        lora_fast.unload_lora_weights(pipe)
        res.lora_fast = dict(
            load_s=t_load, fuse_s=statistics.median(fuse_times), unfuse_s=statistics.median(unfuse_times),
            load_fuse_s=t_e2e, record_bytes=rec, record_fraction_of_weight_bytes=rec / (n_params * elt),
            changed_elements_after_cycles=changed, sample_elements=sum(w.numel() for w in sample),
        )
        log(f"  lora_fast  load {t_load:.3f}s  fuse {res.lora_fast['fuse_s'] * 1e3:.1f} ms  unfuse "
            f"{res.lora_fast['unfuse_s'] * 1e3:.1f} ms  load+fuse {t_e2e:.3f}s  record {rec / 2**20:.1f} MiB "
            f"({100 * res.lora_fast['record_fraction_of_weight_bytes']:.1f}% of fused weight bytes)  changed bits {changed}")
        with torch.no_grad():
            for w, p in zip(sample, pristine):
                w.copy_(p)  # defensive: diffusers starts from pristine weights even if the above failed

        if compare_diffusers:
            gc.collect()
            t0 = time.perf_counter()
            pipe.load_lora_weights(path, adapter_name="bench")
            sync()
            t_dload = time.perf_counter() - t0
            t0 = time.perf_counter()
            pipe.fuse_lora()
            sync()
            t_dfuse_first = time.perf_counter() - t0
            t0 = time.perf_counter()
            pipe.unfuse_lora()
            sync()
            t_dunfuse = [time.perf_counter() - t0]
            d_changed = _changed_bits(sample, pristine)
            t_dfuse = [t_dfuse_first]
            for _ in range(repeats - 1):
                t0 = time.perf_counter()
                pipe.fuse_lora()
                sync()
                t_dfuse.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                pipe.unfuse_lora()
                sync()
                t_dunfuse.append(time.perf_counter() - t0)
            pipe.unload_lora_weights()
            res.diffusers = dict(
                load_s=t_dload, fuse_s=statistics.median(t_dfuse), unfuse_s=statistics.median(t_dunfuse),
                load_fuse_s=t_dload + t_dfuse_first, changed_elements_after_one_cycle=d_changed,
            )
            log(f"  diffusers  load {t_dload:.3f}s  fuse {res.diffusers['fuse_s'] * 1e3:.1f} ms  unfuse "
                f"{res.diffusers['unfuse_s'] * 1e3:.1f} ms  load+fuse {res.diffusers['load_fuse_s']:.3f}s  "
                f"changed after 1 cycle {100 * d_changed / res.lora_fast['sample_elements']:.2f}% of sampled elements")
    del pipe, comps, weights, sample, pristine
    gc.collect()
    return res


def run(cases=("sd15-attn-r4",), dtypes=("fp32", "fp16", "bf16"), *, repeats: int = 3, compare_diffusers: bool = True,
        size: str = "full", log: Callable[[str], None] = print, device: str = "cpu") -> dict:
    """Run the cases and return a JSON-able report (machine, floor, per-case results)."""
    import platform

    floor_bytes = (64 << 20) if size == "tiny" else (512 << 20)
    floor_n = 512 if size == "tiny" else 2048
    floor = dict(copy_bytes_per_s=measure_copy_bandwidth(floor_bytes, device=device),
                 matmul_flops_per_s=measure_matmul_rate(floor_n, device=device))
    log(f"floor: copy {floor['copy_bytes_per_s'] / 1e9:.1f} GB/s (read+write), fp32 matmul "
        f"{floor['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s, {torch.get_num_threads()} threads")
    results = []
    for case in cases:
        for dt in dtypes:
            results.append(asdict(run_case(case, dt, floor=floor, repeats=repeats, compare_diffusers=compare_diffusers,
                                           size=size, log=log, device=device)))
    machine = dict(platform=platform.platform(), processor=_cpu_name(),
                   cpu_count=os.cpu_count(), threads=torch.get_num_threads(), torch=torch.__version__, device=device)
    if str(device).startswith("cuda"):
        machine["gpu"] = torch.cuda.get_device_name(device)
    try:
        import diffusers

        machine["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    return dict(machine=machine, size=size, repeats=repeats, floor=floor, results=results)


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


def _ratio(a, b) -> str:
    return "-" if (a is None or b is None or b == 0) else f"{a / b:.1f}x"


def format_table(report: dict) -> str:
    """The comparison table ``lora-fast bench`` prints: times, ratios to diffusers and to the floor, exactness."""
    head = ["case", "dtype", "modules", "floor ms", "lora_fast fuse", "unfuse", "diffusers fuse", "unfuse",
            "fuse vs diffusers", "fuse / floor", "changed after unfuse: lora_fast", "diffusers"]
    rows = []
    for r in report["results"]:
        lf, df = r["lora_fast"], r.get("diffusers") or {}
        sample = lf.get("sample_elements") or 1
        d_changed = df.get("changed_elements_after_one_cycle")
        rows.append([
            r["case"], r["dtype"], str(r["modules"]), _ms(r["floor_s"]), _ms(lf.get("fuse_s")), _ms(lf.get("unfuse_s")),
            _ms(df.get("fuse_s")), _ms(df.get("unfuse_s")),
            (f"{df['fuse_s'] / lf['fuse_s']:.1f}x faster" if df.get("fuse_s") else "-"),
            _ratio(lf.get("fuse_s"), r["floor_s"]),
            ("0 (bit-exact)" if lf.get("changed_elements_after_cycles") == 0
             else f"{100 * lf['changed_elements_after_cycles'] / sample:.2f}%"),
            "-" if d_changed is None else f"{100 * d_changed / sample:.2f}%",
        ])
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.rjust(w) if i > 1 else h.ljust(w) for i, (h, w) in enumerate(zip(head, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
    m, fl = report["machine"], report["floor"]
    lines.append("")
    lines.append(f"times in ms, median of {report.get('repeats', '?')} warm cycles; floor = max(bytes moved / "
                 f"{fl['copy_bytes_per_s'] / 1e9:.1f} GB/s copy, FLOPs / {fl['matmul_flops_per_s'] / 1e9:.0f} "
                 f"GFLOP/s matmul) measured in this run")
    lines.append("changed after unfuse: share of sampled weight elements that differ from the original after "
                 "fuse+unfuse (lora_fast: after every cycle; diffusers: after one)")
    lines.append(f"machine: {m.get('processor')}, {m.get('threads')} threads, {m.get('device')}, torch {m.get('torch')}"
                 + (f", diffusers {m['diffusers']}" if m.get("diffusers") else "")
                 + (f", {m['gpu']}" if m.get("gpu") else ""))
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
    series = [
        ("floor", [r["floor_s"] for r in results], "#999999"),
        ("lora_fast fuse", [r["lora_fast"].get("fuse_s") for r in results], "#1f77b4"),
        ("lora_fast unfuse", [r["lora_fast"].get("unfuse_s") for r in results], "#6baed6"),
        ("diffusers fuse", [(r.get("diffusers") or {}).get("fuse_s") for r in results], "#d62728"),
        ("diffusers unfuse", [(r.get("diffusers") or {}).get("unfuse_s") for r in results], "#fc9272"),
    ]
    series = [s for s in series if any(v is not None for v in s[1])]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(4 + 2.6 * len(results), 4.5),
                                  gridspec_kw={"width_ratios": [3, 1.4]})
    width = 0.8 / len(series)
    for k, (name, values, color) in enumerate(series):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(results))]
        ys = [(v or 0) * 1e3 for v in values]
        bars = ax.bar(xs, ys, width, label=name, color=color)
        for b, v in zip(bars, values):
            if v is not None:
                ax.annotate(f"{v * 1e3:.0f}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
                            va="bottom", fontsize=7)
    ax.set_yscale("log")
    smallest = min(v for _, values, _ in series for v in values if v)
    ax.set_ylim(bottom=smallest * 1e3 / 3)
    ax.set_ylabel("ms (log scale, lower is better)")
    ax.set_xticks(range(len(results)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_title("fuse / unfuse time")
    ax.legend(fontsize=8)
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
    fig.suptitle(f"lora_fast bench: {m.get('processor')}, {m.get('threads')} threads, {m.get('device')}", fontsize=9)
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

"""Fused weight updates (fuse_lora / unfuse_lora) and the cache of repeated fuse calls.

Fusing builds one merge job per touched weight (lora_fast.merge_jobs): all adapters fused together on that weight
become one concatenated-rank product (up = [λ·w_i·s_i·B_i], down = [A_i]) so each weight is read and written once, and
the whole call goes to the kernels as one grouped job list. Every fuse keeps the kernels' sparse exact-unfuse record,
so ``unfuse_lora`` restores weights bit for bit and a ``safe_fusing`` failure rolls back exactly without cloning
weights first.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from .errors import LoraFusionError
from .kernels import merge as merge_kernels
from .live import dora_weight
from .merge_jobs import fp8_scale, merge_job
from .state import ComponentState, component_states, layer_label
from .targets import is_fan_in_fan_out, resolve_components


@dataclass(eq=False)
class FusedStep:
    """What one fuse call did to one component, enough to undo it exactly.
    Internal: for lora_fast's own modules, not public API."""

    names: list[str]
    jobs: list = field(default_factory=list)  # merge_kernels.MergeJob
    records: merge_kernels.RecordSet = field(default_factory=merge_kernels.RecordSet)  # parallel to jobs
    staged: list = field(default_factory=list)  # (parameter tensor, staging 2-D copy) for non-viewable weights
    backups: list = field(default_factory=list)  # (tensor, full copy): DoRA weights and LoRA biases

    def nbytes(self) -> int:
        return self.records.nbytes() + sum(b.numel() * b.element_size() for _, b in self.backups)


def _dora_view(weight_param: torch.Tensor, module: nn.Module) -> torch.Tensor:
    return weight_param.t() if is_fan_in_fan_out(module) else weight_param


def refuse_during_per_sample(states, what: str) -> None:
    busy = [comp or "module" for comp, _, s in states if s.per_sample is not None]
    if busy:
        raise LoraFusionError(f"{what}: per_sample_adapters is active on {busy}; fuse after leaving it")


def _real(value, what: str) -> float:
    """float(value) for a number (numpy and 1-element tensors included); LoraFusionError for anything else."""
    if not isinstance(value, (bool, str, bytes)):
        try:
            return float(value)
        except (TypeError, ValueError, RuntimeError):
            pass
    raise LoraFusionError(f"{what} must be a number, got {value!r}")


def component_scales(lora_scale, comps) -> dict:
    """{component: float} from ``lora_scale``: one number for every component, or a dict ``{component: number}``
    (a component left out gets 1.0, as with set_adapters' per-component weights). Raises LoraFusionError on anything
    else, or on a dict naming a component the target does not have."""
    if isinstance(lora_scale, dict):
        unknown = sorted(str(k) for k in lora_scale if k not in comps)
        if unknown:
            raise LoraFusionError(f"lora_scale names components {unknown} that the target does not have "
                                  f"(it has {sorted(str(c) for c in comps)})")
        values = {k: _real(v, f"lora_scale[{k!r}]") for k, v in lora_scale.items()}
        return {c: values.get(c, 1.0) for c in comps}
    value = _real(lora_scale, "lora_scale")
    return {c: value for c in comps}


# ----------------------------------------------------------------------------------------- repeat fuses


def _cache_entries() -> int:
    try:
        return max(0, int(os.environ.get("LORA_FAST_FUSE_CACHE", "4")))
    except ValueError:
        return 4


@dataclass(eq=False)
class _Part:
    """One component's share of one fuse call."""

    comp: Optional[str]
    root: nn.Module
    state: ComponentState
    step: FusedStep
    idxs: list  # its jobs in the call's job list
    biased: list  # (label, module, [(layer, factor)]) of the modules with a LoRA bias to fuse
    dora: list  # (label, module, layer, factor)


@dataclass(eq=False)
class _FuseMemo:
    """A fuse call kept for repeating it (docs/fuse.md, "On the GPU: data flow"): the merge jobs (the same objects
    each time, so the kernels' FuseCache keyed on them hits), each job's label, the per-component bookkeeping, and
    what the jobs were built from that the merge key cannot see: each weight's module (the parameter must still be
    ``module.weight``) and the adapter tensors of factors that are converted copies (their ``_version``). Keyed by
    the components' identity and ``fuse_gen``, the adapters fused, their weights and the scale; stored in every
    component it touches (at most LORA_FAST_FUSE_CACHE per component, least recently used dropped first) and dropped
    with any change of their adapters (load, delete, hotswap, set_lora_device, unload) or a failed check."""

    key: tuple
    states: tuple
    parts: list  # (idxs, biased, dora) per component, in call order
    jobs: list
    labels: list
    weights: list  # (module, weight parameter) per job
    sources: list  # (adapter tensor, _version) behind converted factors
    cache: merge_kernels.FuseCache

    def current(self) -> bool:
        for m, w in self.weights:
            if m._parameters.get("weight") is not w:
                return False
        for t, v in self.sources:
            if t._version != v:
                return False
        return self.cache.matches(self.jobs)


def _forget(memo: _FuseMemo) -> None:
    for s in memo.states:
        if s.fuse_memo.get(memo.key) is memo:
            del s.fuse_memo[memo.key]
    memo.cache.clear()


def drop_fuse_cache(state: ComponentState) -> None:
    """Forget every cached fuse call this component takes part in (its adapters or weights changed)."""
    state.fuse_gen += 1
    for memo in list(state.fuse_memo.values()):
        _forget(memo)


def _remember(memo: _FuseMemo, limit: int) -> None:
    for s in memo.states:
        s.fuse_memo[memo.key] = memo
        while len(s.fuse_memo) > limit:
            _forget(next(iter(s.fuse_memo.values())))


class _Check:
    """The FuseGuards of one fuse at cached record positions, with the labels of its jobs."""

    __slots__ = ("guards", "labels", "done")

    def __init__(self, guards, labels):
        self.guards, self.labels, self.done = guards, labels, False

    def poll(self, wait: bool):
        bad = []
        for g in self.guards:
            r = g.poll(wait)
            if r is None:
                return None
            bad.extend(self.labels[i] for i in r)
        self.done = True
        return bad


def check_fuses(states, wait: bool, where: str) -> None:
    """Read the pending checks of fuses made at cached record positions (without waiting for the device unless
    ``wait``); LoraFusionError naming the layers whose weights had changed behind torch's back. ``where`` says what
    state the model is in."""
    bad: list = []
    hit = []
    for _, _, st in states:
        keep = []
        for c in st.fuse_checks:
            if c.done:
                continue
            r = c.poll(wait)
            if r is None:
                keep.append(c)
            elif r:
                bad.extend(x for x in r if x not in bad)
        st.fuse_checks = keep
        hit.append(st)
    if not bad:
        return
    for st in hit:
        drop_fuse_cache(st)
    shown = ", ".join(bad[:8]) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
    raise LoraFusionError(
        f"the weights of {shown} changed without torch seeing it (a write through .data, a raw pointer or another "
        "library's kernel) after lora_fast cached their fuse; the repeated fuse found record counts that no longer "
        "matched and left those parts of the weights unfused (outputs computed while fused lacked the adapters "
        f"there), so that unfusing stays exact. {where} The fuse cache was dropped: the next fuse_lora is a full one. "
        "Change weights through the parameters themselves (param.copy_(...), load_state_dict), which torch tracks"
    )


def fuse(target, lora_scale: float = 1.0, safe_fusing: bool = False, adapter_names=None, components=None,
         adapter_weights=None) -> None:
    states = component_states(target, components)
    refuse_during_per_sample(states, "fuse_lora")
    scales = component_scales(lora_scale, resolve_components(target))
    if adapter_names is not None and isinstance(adapter_names, str):
        adapter_names = [adapter_names]
    if adapter_weights is not None:
        if adapter_names is None:
            raise LoraFusionError("adapter_weights needs adapter_names (a list parallel to it)")
        if isinstance(adapter_weights, (int, float)):
            adapter_weights = [float(adapter_weights)] * len(adapter_names)
        if len(adapter_weights) != len(adapter_names):
            raise LoraFusionError(
                f"adapter_weights has {len(adapter_weights)} entries for {len(adapter_names)} adapter_names"
            )
    if adapter_names is not None:
        known = set().union(*(s.adapters for _, _, s in states)) if states else set()
        missing = [n for n in adapter_names if n not in known]
        if missing:
            raise LoraFusionError(f"no adapter named {missing} is loaded in the selected components")
    check_fuses(states, False, "Nothing was changed by this fuse_lora call.")

    calls = []  # (component, root, state, adapters to fuse, their weights)
    for comp, root, state in states:
        names = list(adapter_names) if adapter_names is not None else list(state.active)
        weights = {}
        for i, n in enumerate(names):
            if adapter_weights is not None:
                weights[n] = float(adapter_weights[i])
            else:
                weights[n] = state.weights.get(n, 1.0)
        already = state.fused_names()
        todo = [n for n in names if n in state.adapters and n not in already]
        skipped = [n for n in names if n in already]
        if skipped:
            warnings.warn(f"{comp or 'module'}: adapters {skipped} are already fused; not fusing them again")
        if todo:
            calls.append((comp, root, state, todo, tuple(weights[n] for n in todo)))
    if not calls:
        return

    limit = _cache_entries()
    key = tuple((id(st), st.fuse_gen, scales[comp], tuple(todo), ws) for comp, _, st, todo, ws in calls)
    memo = calls[0][2].fuse_memo.get(key) if limit else None
    if memo is not None:
        if memo.current():
            calls[0][2].fuse_memo.move_to_end(key)
        else:  # the model changed under the cached call (moved, reloaded, a parameter replaced): forget them all
            for _, _, st, _, _ in calls:
                drop_fuse_cache(st)
            memo = None
            key = tuple((id(st), st.fuse_gen, scales[comp], tuple(todo), ws) for comp, _, st, todo, ws in calls)
    staged: list = []  # (parameter, staging copy) of this call's non-viewable weights, each once
    if memo is not None:
        jobs, labels = memo.jobs, memo.labels
        parts = [_Part(comp, root, st, FusedStep(names=list(todo)), idxs, biased, dora)
                 for (comp, root, st, todo, _), (idxs, biased, dora) in zip(calls, memo.parts)]
    else:
        jobs, labels, parts, wmods, sources = _build_jobs(calls, scales, staged)
        if limit and not staged and all(m is not None for m, _ in wmods):
            memo = _FuseMemo(key, tuple(c[2] for c in calls), [(p.idxs, p.biased, p.dora) for p in parts], jobs,
                             labels, wmods, sources, merge_kernels.FuseCache())

    # safe_fusing: a non-finite result leaves every weight of the call untouched (nothing to attach, nothing to undo)
    records, nonfinite = (merge_kernels.fuse(jobs, record=True, check_finite=safe_fusing, abort_nonfinite=safe_fusing,
                                             cache=memo.cache if memo is not None else None)
                          if jobs else (merge_kernels.RecordSet(), []))
    if not any(nonfinite):
        for p in parts:
            p.step.jobs.extend(jobs[i] for i in p.idxs)
            p.step.records.extend(records.subset(p.idxs))

    def rollback():
        for p in reversed(parts):
            undo_step(p.step)

    try:
        if safe_fusing and any(nonfinite):
            bad = labels[nonfinite.index(True)]
            raise LoraFusionError(f"{bad}: fusing gives non-finite weights (NaN/Inf, or beyond fp8's range); every "
                                  "weight was left unchanged")
        for param, staging in staged:
            param.copy_(staging.view(param.shape) if staging.is_contiguous() else staging.reshape(param.shape))
        _fuse_biases(parts, safe_fusing)
        for p in parts:
            for label, module, layer, factor in p.dora:
                w = module.weight.data
                p.step.backups.append((w, w.clone()))
                new = dora_weight(_dora_view(w, module), layer, factor)
                if safe_fusing and not torch.isfinite(new).all():
                    raise LoraFusionError(f"{label}: fusing gives non-finite weights (NaN/Inf); every weight was left "
                                          "unchanged")
                _dora_view(w, module).copy_(new)
    except BaseException:
        rollback()
        raise
    if memo is not None:
        _remember(memo, limit)
        if memo.cache.guards:
            check = _Check(memo.cache.guards, labels)
            for p in parts:
                p.state.fuse_checks.append(check)
    for p in parts:
        p.state.fused.append(p.step)
        p.state.epoch += 1
        p.state.bump()  # fused adapters stop running live


def _build_jobs(calls, scales, staged):
    """The merge jobs of a fuse call (additive adapters of every touched weight of every component, one grouped
    kernel call), their labels, the per-component parts, and what a _FuseMemo checks besides the merge key."""
    jobs, labels, parts, wmods, sources = [], [], [], [], []
    for comp, root, state, todo, ws in calls:
        per_module: dict[int, tuple[str, nn.Module, list]] = {}
        for n, w in zip(todo, ws):
            for path, b in state.adapters[n].items():
                entry = per_module.setdefault(id(b.module), (layer_label(comp, path), b.module, []))
                entry[2].append((b.layer, scales[comp] * w))
        part = _Part(comp, root, state, FusedStep(names=list(todo)), [], [], [])
        for label, module, items in per_module.values():
            additive = [(l, f) for l, f in items if l.magnitude is None]
            part.dora.extend((label, module, l, f) for l, f in items if l.magnitude is not None)
            if any(l.magnitude is not None for l, _ in items) and fp8_scale(module, label) is not None:
                raise LoraFusionError(f"{label}: DoRA on a scaled fp8 weight is not supported; nothing was changed")
            biased = [(l, f) for l, f in additive if l.bias is not None]
            if biased:
                if getattr(module, "bias", None) is None:
                    raise LoraFusionError(f"{label}: the adapter has a LoRA bias but the module has no bias")
                part.biased.append((label, module, biased))
            if not additive:
                continue
            job = merge_job(module, additive, part.step, staged)
            part.idxs.append(len(jobs))
            jobs.append(job)
            labels.append(label)
            wmods.append((module, job.weight))
            for layer, _ in additive:  # LoHa/LoKr/full terms are built from copies: watch the adapter's tensors
                if layer.algorithm != "lora":
                    sources.extend((t, t._version) for t in layer.lycoris.values() if isinstance(t, torch.Tensor))
            scale = fp8_scale(module, label)
            if scale is not None:  # a repeat must see a changed scale
                sources.append((scale, scale._version))
            for (layer, _), f in zip([x for x in additive if x[0].algorithm == "lora"], job.factors or ()):
                if f.up is not layer.up and f.up is not layer.down:  # a converted copy: watch its sources
                    sources.extend((t, t._version) for t in (layer.up, layer.down, layer.mid) if t is not None)
        parts.append(part)
    return jobs, labels, parts, wmods, sources


def attach_records(owners, jobs, records) -> None:
    """Give each step its jobs and its part of one fuse call's records (a RecordSet subset: no tensor operation)."""
    by_step: dict = {}
    for i, step in enumerate(owners):
        by_step.setdefault(id(step), (step, []))[1].append(i)
    for step, idxs in by_step.values():
        step.jobs.extend(jobs[i] for i in idxs)
        step.records.extend(records.subset(idxs))


def _fuse_biases(parts, safe_fusing: bool) -> None:
    for part in parts:
        step = part.step
        for label, module, biased in part.biased:
            b = module.bias.data
            step.backups.append((b, b.clone()))
            acc = b.float()
            for layer, factor in biased:
                acc = acc + layer.bias.float().to(acc.device) * (layer.scale * factor)
            if safe_fusing and not torch.isfinite(acc).all():
                raise LoraFusionError(f"{label}: fusing the LoRA bias gives non-finite values; nothing was changed")
            b.copy_(acc.to(b.dtype))


def undo_step(step: FusedStep) -> None:
    """Restore exactly what one fuse step changed (backups, records, staged weights) and empty it.
    Internal: for lora_fast's own modules, not public API."""
    for tensor, backup in reversed(step.backups):
        tensor.copy_(backup)
    step.backups.clear()
    if step.jobs:
        merge_kernels.unfuse(step.jobs, step.records)
        for param, staging in step.staged:
            param.copy_(staging.reshape(param.shape))
    step.jobs.clear()
    step.records.clear()
    step.staged.clear()


def unfuse(target, components=None) -> None:
    states = component_states(target, components)
    for comp, root, state in states:
        if not state.fused:
            continue
        try:
            while state.fused:
                undo_step(state.fused.pop())
        finally:
            state.epoch += 1
            state.bump()  # after the weights are restored: the gates and DoRA caches are written from them
    check_fuses(states, False, "unfuse_lora has restored every weight exactly.")


def fused_record_bytes(target) -> int:
    """Bytes held to make unfuse exact (sparse records plus DoRA/bias backups). Waits for the checks of fuses made
    at cached record positions (see check_fuses) and raises if one failed."""
    states = component_states(target, check=False)
    check_fuses(states, True, "Those weights are still fused; unfuse_lora restores them exactly.")
    return sum(step.nbytes() for _, _, s in states for step in s.fused)

"""Per-sample adapters: one forward pass in which every sample of the batch runs its own LoRA (or mix of LoRAs).

``per_sample_adapters(target, ["a", "b", None, {"a": 0.5, "c": 1.0}])`` installs a :class:`PerSampleSpec` on the
state of each selected component; the live-adapter hooks (lora_fast.live.ModuleHook) hand their forward to it
while it is installed. For every adapted module, sample ``j`` of the module's batch uses entry ``j mod n``
(n = the list's length): classifier-free guidance runs the uncond and the cond halves as two blocks of n samples.

Linear layers (plain LoRA, inputs and outputs in the layer's dtype, nothing requiring grad) go through the
segmented shrink/expand kernels (lora_fast.kernels.shrink_expand): one shrink and one expand launch per layer
for all adapters of the batch, with the activation's rows grouped by adapter through a row map (attention
flattens samples into tokens, so the map is per row, derived from the sample index). Convolutions run the same
terms as batched products over the samples of their channels-first activations. Everything else (grouped convs,
embeddings, DoRA, LoRA biases, autograd) runs the adapter's own live forward on the gathered samples of each
adapter: the same result as a sample run alone, at one small batch per adapter.

The base model is never touched, so nothing has to be undone: leaving the context restores the previous
adapter selection exactly (set_adapters state is not modified either).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Optional

import torch
from torch import nn

from .engine import component_states as _states, layer_label as _label
from .errors import LoraFormatError, LoraFusionError
from .kernels.shrink_expand import RowMap, build_row_map, lora_expand, lora_shrink, segmented_expand, segmented_shrink
from .live import _sharing, cached_row_map, conv_terms, kernel_slot, shared_shrink, slot_groups
from .targets import resolve_components


def _normalize(adapters) -> list[list[tuple[str, float]]]:
    """Entries as lists of (adapter name, weight): None -> [], "a" -> [("a", 1.0)], {"a": w, ...} -> pairs."""
    if isinstance(adapters, (str, bytes, Mapping)) or not isinstance(adapters, Sequence):
        raise LoraFormatError(
            f"per_sample_adapters: expected a list with one entry per sample, got {type(adapters).__name__}")
    if len(adapters) == 0:
        raise LoraFormatError("per_sample_adapters: the list of per-sample entries is empty")
    out = []
    for i, entry in enumerate(adapters):
        if entry is None:
            out.append([])
        elif isinstance(entry, str):
            out.append([(entry, 1.0)])
        elif isinstance(entry, Mapping):
            pairs = []
            for name, w in entry.items():
                if not isinstance(name, str):
                    raise LoraFormatError(f"per_sample_adapters: entry {i}: adapter names must be strings, got {name!r}")
                try:
                    w = float(w)
                except (TypeError, ValueError):
                    raise LoraFormatError(f"per_sample_adapters: entry {i}: weight of {name!r} is not a number: {w!r}")
                if not math.isfinite(w):
                    raise LoraFormatError(f"per_sample_adapters: entry {i}: weight of {name!r} is {w}")
                pairs.append((name, w))
            out.append(pairs)
        else:
            raise LoraFormatError(f"per_sample_adapters: entry {i} is a {type(entry).__name__}; expected an adapter "
                                  "name, a dict {adapter name: weight}, or None (base model)")
    return out


def activate(target, adapters, components=None) -> list:
    """Validate and install per-sample entries on the selected components; returns what :func:`deactivate` needs."""
    entries = _normalize(adapters)
    if components is not None:
        if isinstance(components, str):
            components = [components]
        have = set(resolve_components(target))
        unknown = [c for c in components if c not in have]
        if unknown:
            raise LoraFormatError(f"per_sample_adapters: components {unknown} are not in the target "
                                  f"(it has {sorted(str(c) for c in have)})")
    states = [(c, s) for c, _, s in _states(target, components) if s.adapters]
    loaded = set().union(*(s.adapters for _, s in states)) if states else set()
    names: list[str] = []
    for entry in entries:
        for n, _ in entry:
            if n not in names:
                names.append(n)
    missing = [n for n in names if n not in loaded]
    if missing:
        raise LoraFormatError(f"per_sample_adapters: no adapter named {missing} is loaded in the selected components "
                              f"(loaded: {sorted(loaded)})")
    for comp, s in states:
        fused = sorted(s.fused_names())
        if fused:
            raise LoraFusionError(f"per_sample_adapters: adapters {fused} are fused into {comp or 'the module'}; "
                                  "per-sample adapters run on unfused base weights: call unfuse_lora first")
    installed = []
    for comp, s in states:  # no version bump: the ordinary plans stay valid (and compiled graphs keep their guards)
        # Groups are every adapter of the component in a fixed order, so the per-layer kernel tables built for one
        # block serve every later block; an entry's adapters missing from this component contribute nothing here.
        comp_names = tuple(sorted(s.adapters))
        group = {n: g for g, n in enumerate(comp_names)}
        by_group = tuple(tuple((group[n], w) for n, w in entry if n in group) for entry in entries)
        installed.append((s, s.per_sample))
        s.per_sample = PerSampleSpec(comp, comp_names, by_group, s)
        s.per_sample_on = True
    return installed


def deactivate(installed: list) -> None:
    for state, previous in reversed(installed):
        state.per_sample = previous
        state.per_sample_on = previous is not None


class PerSampleSpec:
    """The per-sample entries of one component; row maps are cached on the component state (bounded), so a block
    that repeats earlier entries (every denoising step of a request, or the next request with the same mix) reuses
    them and the per-layer data derived from them."""

    def __init__(self, component: Optional[str], names: tuple, entries: tuple, state):
        self.component = component
        self.names = names  # group index -> adapter name (every adapter of the component, sorted)
        self.entries = entries  # per entry: ((group, weight), ...)
        self.cache = state.per_sample_rows  # OrderedDict shared by the component's blocks

    def row_map(self, batch: int, rows_per_sample: int, device: torch.device, path: str) -> RowMap:
        n = len(self.entries)
        if batch % n:
            raise LoraFormatError(
                f"per_sample_adapters: {_label(self.component, path)} (component {self.component or 'module'}) "
                f"runs a batch of {batch}, which is not a multiple of the {n} per-sample entries (a component "
                "that sees one input for several images, e.g. a text encoder given one prompt, can be left on "
                "set_adapters with components=[...])")
        key = (self.names, self.entries, batch, rows_per_sample, device)
        return cached_row_map(self.cache, key, lambda: build_row_map(self.entries, batch, rows_per_sample, device))

    def _plan(self, hook, module: nn.Module):
        """(AdapterGroups of the kernel-path groups or None, {group: slot} of the rest), or None if no group
        touches this module. Cached on the hook until adapters are loaded, deleted, hotswapped or moved (not when
        set_adapters/enable/disable change the selection)."""
        state = hook.state
        w = module.weight
        key = (self.names, state.slot_epoch, state.swaps, w.device, w.dtype)
        cached = hook.per_sample_cache
        if cached is not None and cached[0] == key:
            return cached[1]
        slots = []
        for name in self.names:
            slot = hook.slots.get(name)
            slots.append(slot if slot is not None and hook.ready(slot, module) else None)
        plan = None
        if any(s is not None for s in slots):
            fast = [s if s is not None and kernel_slot(s, module) else None for s in slots]
            groups = slot_groups(fast)
            generic = {g: s for g, s in enumerate(slots) if s is not None and fast[g] is None}
            plan = (groups, generic, slots, fast)
        hook.per_sample_cache = (key, plan)
        return plan

    def forward(self, hook, module: nn.Module, args, kwargs, out):
        state = hook.state
        if not state.enabled:
            return None
        lam = state.call_scale
        if lam == 0.0:
            return None
        plan = self._plan(hook, module)
        if plan is None:
            return None
        groups, generic, slots, fast = plan
        x = args[0] if args else next(iter(kwargs.values()))
        batch = x.shape[0] if x.dim() >= 2 else 1  # a 1-D input is one unbatched sample
        no_grad = not (torch.is_grad_enabled() and (x.requires_grad or out.requires_grad))
        if isinstance(module, nn.Conv2d):
            if (groups is not None and not generic and no_grad and x.dim() == 4 and out.dim() == 4
                    and x.dtype == out.dtype == groups.dtype):
                rm = self.row_map(batch, 1, x.device, hook.path)
                if not out.is_contiguous():
                    out = out.contiguous()
                conv_terms(module, x, out, groups, rm, lam)
                return out
            groups = None  # anything else on a conv: each adapter's own forward
        use_kernel = (groups is not None and x.dtype == out.dtype == groups.dtype and x.shape[-1] == groups.in_features
                      and out.shape[-1] == groups.out_features and no_grad)
        if not use_kernel:  # every group takes the per-adapter path
            generic = {g: s for g, s in enumerate(slots) if s is not None}
        rows_per_sample = x.numel() // max(1, batch * x.shape[-1]) if use_kernel else 1
        rm = self.row_map(batch, rows_per_sample, x.device, hook.path)
        if use_kernel:
            x2 = x.reshape(-1, groups.in_features)
            if not out.is_contiguous():
                out = out.contiguous()
            # modules with equal downs (a split fused projection) and the same input shrink once per forward
            sharing = _sharing(state)
            rm_key = (self.names, self.entries, batch, rows_per_sample, x.device)
            if not generic:  # every group on the kernel path (the torch backend may batch the samples)
                shrunk = shared_shrink(sharing, state, fast, ("segmented", rm_key), x,
                                       lambda: segmented_shrink(x2, groups, rm))
                segmented_expand(out.view(-1, groups.out_features), shrunk, groups, rm, lam)
                return out
            h = shared_shrink(sharing, state, fast, ("rows", rm_key), x, lambda: lora_shrink(x2, groups, rm))
        for p, (first, end) in enumerate(rm.passes):
            if use_kernel:
                lora_expand(out.view(-1, groups.out_features), h, groups, rm, lam, passes=[p])
            for s in range(first, end):
                slot = generic.get(rm.seg_group_host[s])
                if slot is not None:
                    out = _apply_to_samples(slot, module, x, out, rm.samples[s], rm.sample_coef[s], lam)
        return out


def _apply_to_samples(slot, module: nn.Module, x: torch.Tensor, out: torch.Tensor, samples: list, weights: list,
                      lam: float) -> torch.Tensor:
    """The adapter's own live forward on the samples that use it (one small batch per distinct weight)."""
    by_weight: dict[float, list[int]] = {}
    for j, w in zip(samples, weights):
        by_weight.setdefault(w, []).append(j)
    in_place = not (torch.is_grad_enabled() and out.requires_grad)  # else out-of-place, so autograd sees it
    for w, js in by_weight.items():
        if len(js) == out.shape[0]:  # the whole batch: no gather
            out = slot.apply(module, x, out, lam, weight=w)
            continue
        idx = torch.tensor(js, dtype=torch.int64, device=out.device)
        part = slot.apply(module, x.index_select(0, idx), out.index_select(0, idx), lam, weight=w).to(out.dtype)
        out = out.index_copy_(0, idx, part) if in_place else out.index_copy(0, idx, part)
    return out

"""`lora-fast merge` of Flux.1 LoRAs (kohya sd-scripts layout: fused qkv / linear1 modules split into diffusers modules
sharing one down matrix) into Flux transformer checkpoints.

* a sharded diffusers-named checkpoint (``save_pretrained(..., max_shard_size=...)``: shards + index), given as the
  model folder or as the index file: the merged checkpoint, loaded back with diffusers, equals lora_fast.fuse_lora
  on the model in memory bit for bit, in fp32 and bf16, with adapter weights;
* the original BFL-named single file (``double_blocks.N.img_attn.qkv.weight``..., optionally with ComfyUI's
  ``model.diffusion_model.`` prefix): each diffusers module fused into its row range of the fused BFL tensor; equal to
  fuse_lora on the diffusers model written back in BFL names, and (the independent oracle) diffusers' own single-file
  conversion of the merged file equals the model fused in memory, bit for bit.
"""

import json
import os
import shutil

import pytest
import torch

pytest.importorskip("diffusers")

import diffusers  # noqa: E402

import lora_fast  # noqa: E402
from lora_fast import checkpoint, io  # noqa: E402
from lora_fast.cli import main as cli_main  # noqa: E402
from lora_fast.errors import LoraFormatError  # noqa: E402
from lora_fast.formats.flux import FLUX_MODULES, detect_flux_layout  # noqa: E402
from lora_fast.formats.fused import kohya_name  # noqa: E402
from lora_fast.models import build_flux_transformer  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

WEIGHTS = "diffusion_pytorch_model"
INDEX = f"{WEIGHTS}.safetensors.index.json"


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def _modules_of(transformer):
    """(BFL name, FusedModule, block index or None) for every module of the Flux table present in ``transformer``."""
    counts = {"double_blocks": len(transformer.transformer_blocks),
              "single_blocks": len(transformer.single_transformer_blocks)}
    for m in FLUX_MODULES:
        kind = m.bfl.split(".", 1)[0]
        if kind in counts:
            for i in range(counts[kind]):
                yield m.bfl.format(i=i), m, i
        else:
            yield m.bfl, m, None


def _kohya_flux_lora(transformer, *, rank=4, seed=0, dtype=torch.float32) -> dict:
    """A random sd-scripts Flux LoRA on every module of the table (blocks, embedders, final layer; alphas vary,
    some missing = rank), factors exact in bf16 so every dtype sees the same values."""
    g = torch.Generator().manual_seed(seed)
    mods = dict(transformer.named_modules())
    sd = {}
    for j, (bfl, m, i) in enumerate(_modules_of(transformer)):
        paths = [p.format(i=i) for p, _ in m.targets]
        rows = sum(mods[p].out_features for p in paths)
        in_f = mods[paths[0]].in_features
        name = kohya_name(bfl)
        sd[f"{name}.lora_down.weight"] = (torch.randn(rank, in_f, generator=g) / in_f**0.5).bfloat16().to(dtype)
        sd[f"{name}.lora_up.weight"] = (torch.randn(rows, rank, generator=g) * 0.05).bfloat16().to(dtype)
        alpha = (None, 2.0, 8.0)[j % 3]
        if alpha is not None:
            sd[f"{name}.alpha"] = torch.tensor(alpha)
    return sd


def _tiny_transformer(dtype):
    return build_flux_transformer("tiny", dtype=dtype, seed=0)


def _save_sharded(transformer, folder) -> list[str]:
    total = sum(p.numel() * p.element_size() for p in transformer.state_dict().values())
    transformer.save_pretrained(folder, max_shard_size=f"{max(1, total // 4 // 1000)}KB", safe_serialization=True)
    shards = sorted(n for n in os.listdir(folder) if n.startswith(WEIGHTS) and n.endswith(".safetensors"))
    assert len(shards) >= 3 and all("-of-" in n for n in shards), shards
    assert os.path.isfile(os.path.join(folder, INDEX))
    return shards


def _merge(*args) -> int:
    return cli_main(["merge", "--no-progress", *map(str, args)])


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory):
    where = tmp_path_factory.mktemp("flux_loras")
    t = _tiny_transformer(torch.float32)
    kohya = where / "flux_kohya.safetensors"
    sd = _kohya_flux_lora(t, seed=1)
    assert detect_flux_layout(sd) == "kohya"
    io.save_file(sd, str(kohya))
    # a second adapter in the diffusers layout (the same table, another seed, written under diffusers names)
    second = where / "flux_diffusers.safetensors"
    lora_fast.read_lora(_kohya_flux_lora(t, rank=2, seed=2)).save(str(second), format="diffusers")
    return kohya, second


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("base_as", ["folder", "index"])
def test_merge_kohya_flux_into_sharded_checkpoint_equals_fuse_lora(tmp_path, lora_files, dtype, base_as):
    kohya, _ = lora_files
    base_dir = tmp_path / "transformer"
    shards = _save_sharded(_tiny_transformer(dtype), base_dir)
    out = tmp_path / "merged"
    base = base_dir if base_as == "folder" else base_dir / INDEX
    assert _merge("--base", base, "--lora", kohya, "-o", out) == 0
    if base_as == "index":  # an index base writes the index and the shards only; diffusers needs the config too
        assert sorted(os.listdir(out)) == sorted(shards + [INDEX])
        shutil.copy(base_dir / "config.json", out / "config.json")

    # same sharding: the same files, the same tensors in each, the same index
    for name in shards:
        assert list(io.read_header(str(out / name)).tensors) == list(io.read_header(str(base_dir / name)).tensors)
    assert json.loads((out / INDEX).read_text()) == json.loads((base_dir / INDEX).read_text())

    merged = diffusers.FluxTransformer2DModel.from_pretrained(out, torch_dtype=dtype)
    ref = diffusers.FluxTransformer2DModel.from_pretrained(base_dir, torch_dtype=dtype)
    pristine = {k: v.clone() for k, v in ref.state_dict().items()}
    lora_fast.load_lora_weights({"transformer": ref}, str(kohya), fuse=True)
    want, got = ref.state_dict(), merged.state_dict()
    assert list(got) == list(want)
    changed = [k for k in want if not _bits_equal(want[k], pristine[k])]
    # every module of the table: per double block 2 streams x (q, k, v, out, mlp in, mlp out, modulation); per
    # single block q, k, v, mlp, proj_out, modulation; 8 embedder layers; the final layer (proj_out, norm_out)
    assert len(changed) == 2 * 14 + 2 * 6 + 8 + 2, changed
    assert {k for k in changed if k.startswith("single_transformer_blocks.0.")} == {
        f"single_transformer_blocks.0.{p}.weight" for p in
        ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out", "norm.linear")}
    bad = [k for k in want if not _bits_equal(got[k], want[k])]
    assert not bad, f"{len(bad)} tensors differ from lora_fast.fuse_lora in memory, e.g. {bad[:3]}"
    # and the in-memory fuse undoes exactly, so the comparison was against a fuse of the same base
    lora_fast.unfuse_lora({"transformer": ref})
    assert all(_bits_equal(v, pristine[k]) for k, v in ref.state_dict().items())


def test_merge_two_weighted_flux_adapters_into_sharded_checkpoint(tmp_path, lora_files):
    """kohya file x0.75 and a diffusers-layout file x-0.5 on the same weights, one rounding: equals
    fuse_lora(adapter_names=[...], adapter_weights=[...]) in memory (bf16)."""
    kohya, second = lora_files
    base_dir = tmp_path / "transformer"
    _save_sharded(_tiny_transformer(torch.bfloat16), base_dir)
    out = tmp_path / "merged"
    assert _merge("--base", base_dir, "--lora", f"{kohya}:0.75", "--lora", f"{second}:-0.5", "-o", out) == 0
    merged = diffusers.FluxTransformer2DModel.from_pretrained(out, torch_dtype=torch.bfloat16)
    ref = diffusers.FluxTransformer2DModel.from_pretrained(base_dir, torch_dtype=torch.bfloat16)
    target = {"transformer": ref}
    lora_fast.load_lora_weights(target, str(kohya), adapter_name="a")
    lora_fast.load_lora_weights(target, str(second), adapter_name="b")
    lora_fast.fuse_lora(target, adapter_names=["a", "b"], adapter_weights=[0.75, -0.5])
    want, got = ref.state_dict(), merged.state_dict()
    bad = [k for k in want if not _bits_equal(got[k], want[k])]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:3]}"


# ------------------------------------------------------------------------------------------- BFL-named single file


def _bfl_state_dict(transformer) -> dict:
    """The table's modules of a diffusers Flux transformer under their original (BFL) names, fused as the BFL
    checkpoint stores them: ``double_blocks.N.img_attn.qkv.weight`` = cat(to_q, to_k, to_v), ``single_blocks.N.linear1``
    = cat(to_q, to_k, to_v, proj_mlp), ``final_layer.adaLN_modulation.1`` = (shift, scale) halves swapped back."""
    sd = transformer.state_dict()
    out = {}
    for bfl, m, i in _modules_of(transformer):
        for suffix in ("weight", "bias"):
            parts = [sd[f"{p.format(i=i)}.{suffix}"] for p, _ in m.targets]
            if m.bfl == "final_layer.adaLN_modulation.1":
                scale, shift = parts[0].chunk(2)
                parts = [shift, scale]
            out[f"{bfl}.{suffix}"] = torch.cat(parts).contiguous()
    return out


def test_bfl_state_dict_helper_inverts_the_table():
    t = _tiny_transformer(torch.float32)
    sd = _bfl_state_dict(t)
    inner = t.inner_dim
    assert sd["double_blocks.0.img_attn.qkv.weight"].shape == (3 * inner, inner)
    assert sd["single_blocks.1.linear1.weight"].shape == (7 * inner, inner)
    assert torch.equal(sd["single_blocks.1.linear1.weight"][3 * inner:], t.single_transformer_blocks[1].proj_mlp.weight)
    assert torch.equal(sd["final_layer.adaLN_modulation.1.weight"][:inner], t.norm_out.linear.weight[inner:])


def test_merge_kohya_flux_into_bfl_named_single_file(tmp_path, lora_files):
    kohya, _ = lora_files
    t = _tiny_transformer(torch.bfloat16)
    base = tmp_path / "flux1-dev.safetensors"
    io.save_file(_bfl_state_dict(t), str(base))
    out = tmp_path / "flux1-dev-merged.safetensors"
    # the Python API, so that the error itself reaches pytest (the command would turn it into exit status 2)
    checkpoint.merge(str(base), [checkpoint.LoraSpec(lora_fast.read_lora(str(kohya)), 1.0, kohya.name)], str(out))
    lora_fast.load_lora_weights({"transformer": t}, str(kohya), fuse=True)
    want, got = _bfl_state_dict(t), io.load_file(str(out))
    assert list(got) == list(io.read_header(str(base)).tensors) and sorted(got) == sorted(want)  # the base's order
    bad = [k for k in want if not _bits_equal(got[k], want[k])]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:3]}"


def test_merge_two_weighted_adapters_into_comfyui_prefixed_bfl_file(tmp_path, lora_files):
    """ComfyUI's full-model spelling (``model.diffusion_model.double_blocks...``, plus tensors no LoRA targets) is
    accepted for Flux-named tensors: a kohya file x0.75 and a diffusers-layout file x-0.5, one rounding per element,
    through the command, in bf16: equals fuse_lora(adapter_names=[...], adapter_weights=[...]) on the diffusers model."""
    kohya, second = lora_files
    t = _tiny_transformer(torch.bfloat16)
    prefix = "model.diffusion_model."
    sd = {prefix + k: v for k, v in _bfl_state_dict(t).items()}
    sd[prefix + "double_blocks.0.img_attn.norm.query_norm.scale"] = torch.ones(8, dtype=torch.bfloat16)
    base = tmp_path / "flux1-dev.safetensors"
    io.save_file(sd, str(base))
    out = tmp_path / "merged.safetensors"
    assert _merge("--base", base, "--lora", f"{kohya}:0.75", "--lora", f"{second}:-0.5", "-o", out) == 0
    target = {"transformer": t}
    lora_fast.load_lora_weights(target, str(kohya), adapter_name="a")
    lora_fast.load_lora_weights(target, str(second), adapter_name="b")
    lora_fast.fuse_lora(target, adapter_names=["a", "b"], adapter_weights=[0.75, -0.5])
    want = {prefix + k: v for k, v in _bfl_state_dict(t).items()}
    want[prefix + "double_blocks.0.img_attn.norm.query_norm.scale"] = sd[prefix + "double_blocks.0.img_attn.norm.query_norm.scale"]
    got = io.load_file(str(out))
    assert sorted(got) == sorted(want)
    bad = [k for k in want if not _bits_equal(got[k], want[k])]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:3]}"


def test_merge_refuses_an_adapter_that_does_not_fit_the_bfl_rows(tmp_path, lora_files):
    """A Flux LoRA of another width: the fused tensor's rows for it are named in the error; nothing is written."""
    kohya, _ = lora_files
    t = build_flux_transformer("tiny", dtype=torch.float32, seed=0)
    sd = _bfl_state_dict(t)
    q = sd["double_blocks.0.img_attn.qkv.weight"]
    sd["double_blocks.0.img_attn.qkv.weight"] = torch.cat([q, q[:3]])  # rows no longer 3 x inner
    base = tmp_path / "flux1-dev.safetensors"
    io.save_file(sd, str(base))
    out = tmp_path / "merged.safetensors"
    with pytest.raises(LoraFormatError, match="does not fit this base model"):
        checkpoint.merge(str(base), [checkpoint.LoraSpec(lora_fast.read_lora(str(kohya)), 1.0, kohya.name)], str(out))
    assert not out.exists()


def _full_bfl_state_dict(transformer) -> dict:
    """_bfl_state_dict plus the QK-norm scales: every tensor diffusers' single-file Flux conversion reads."""
    sd = _bfl_state_dict(transformer)
    own = transformer.state_dict()
    for i in range(len(transformer.transformer_blocks)):
        for stream, (q, k) in (("img_attn", ("norm_q", "norm_k")), ("txt_attn", ("norm_added_q", "norm_added_k"))):
            sd[f"double_blocks.{i}.{stream}.norm.query_norm.scale"] = own[f"transformer_blocks.{i}.attn.{q}.weight"]
            sd[f"double_blocks.{i}.{stream}.norm.key_norm.scale"] = own[f"transformer_blocks.{i}.attn.{k}.weight"]
    for i in range(len(transformer.single_transformer_blocks)):
        sd[f"single_blocks.{i}.norm.query_norm.scale"] = own[f"single_transformer_blocks.{i}.attn.norm_q.weight"]
        sd[f"single_blocks.{i}.norm.key_norm.scale"] = own[f"single_transformer_blocks.{i}.attn.norm_k.weight"]
    return sd


def test_merged_bfl_file_read_by_diffusers_single_file_conversion_equals_fuse_lora(tmp_path, lora_files, monkeypatch):
    """The independent oracle: diffusers' own BFL -> diffusers conversion (convert_flux_transformer_checkpoint_to_
    diffusers: qkv/linear1 splits, the swapped final adaLN) of the merged file gives, tensor for tensor and bit for bit,
    the diffusers model fused in memory with lora_fast.fuse_lora (two weighted adapters, bf16)."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    kohya, second = lora_files
    t = _tiny_transformer(torch.bfloat16)
    base = tmp_path / "flux1-dev.safetensors"
    io.save_file(_full_bfl_state_dict(t), str(base))
    out = tmp_path / "merged.safetensors"
    specs = [checkpoint.LoraSpec(lora_fast.read_lora(str(kohya)), 0.75, kohya.name),
             checkpoint.LoraSpec(lora_fast.read_lora(str(second)), -0.5, second.name)]
    checkpoint.merge(str(base), specs, str(out))
    # diffusers hard-codes Flux.1's width (3072) for linear1's split; at the tiny width give it the same 1:1:1:4 parts
    real_split = torch.split

    def split(x, size, dim=0):
        if isinstance(size, (tuple, list)) and tuple(size) == (3072, 3072, 3072, 12288) and x.shape[dim] != 21504:
            unit = x.shape[dim] // 7
            size = (unit, unit, unit, 4 * unit)
        return real_split(x, size, dim)

    monkeypatch.setattr(torch, "split", split)
    got = convert_flux_transformer_checkpoint_to_diffusers(io.load_file(str(out)))
    monkeypatch.undo()
    target = {"transformer": t}
    lora_fast.load_lora_weights(target, str(kohya), adapter_name="a")
    lora_fast.load_lora_weights(target, str(second), adapter_name="b")
    lora_fast.fuse_lora(target, adapter_names=["a", "b"], adapter_weights=[0.75, -0.5])
    want = t.state_dict()
    assert sorted(got) == sorted(want)
    bad = [k for k in want if not _bits_equal(got[k].contiguous(), want[k])]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:3]}"


def test_merge_into_bfl_file_with_dtype_conversion(tmp_path, lora_files):
    """fp32 BFL base, --dtype bf16: each part summed in fp32 on its rows and rounded once to bf16 (= fuse_lora on the
    fp32 model, then cast); untouched tensors are cast."""
    kohya, _ = lora_files
    t = _tiny_transformer(torch.float32)
    base = tmp_path / "flux1-dev.safetensors"
    io.save_file(_full_bfl_state_dict(t), str(base))
    out = tmp_path / "merged.safetensors"
    assert _merge("--base", base, "--lora", kohya, "--dtype", "bf16", "-o", out) == 0
    lora_fast.load_lora_weights({"transformer": t}, str(kohya), fuse=True)
    want = {k: v.bfloat16() for k, v in _full_bfl_state_dict(t).items()}
    got = io.load_file(str(out))
    assert sorted(got) == sorted(want)
    bad = [k for k in want if not _bits_equal(got[k], want[k])]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:3]}"

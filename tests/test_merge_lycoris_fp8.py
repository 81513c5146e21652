"""``lora-fast merge`` with LyCORIS adapters (LoHa, LoKr, full diff, mixed with LoRA), SD1.x kohya files in LDM/SGM
names, and fp8 bases (float8_e4m3fn/e5m2, plain or per-tensor scaled: ComfyUI's ``scale_weight``, vLLM's
``weight_scale``). The oracle is ``lora_fast.fuse_lora`` on the same model in memory: the merged file must hold the
same bits (one rounding into the weight's own dtype, fp8 included; the scale tensors unchanged)."""

from __future__ import annotations

import contextlib
import copy
import io as _io
import json
import os
import struct

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("lycoris")
from lycoris.modules.full import FullModule  # noqa: E402
from lycoris.modules.loha import LohaModule  # noqa: E402
from lycoris.modules.lokr import LokrModule  # noqa: E402

import lora_fast  # noqa: E402
from lora_fast import io  # noqa: E402
from lora_fast.cli import main as cli_main  # noqa: E402
from lora_fast.formats.kohya import kohya_module_name  # noqa: E402
from lora_fast.models import build_components  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
ATTN = "unet.down_blocks.0.attentions.0.transformer_blocks.0"
Q, K, V, OUT = (f"{ATTN}.attn1.{n}" for n in ("to_q", "to_k", "to_v", "to_out.0"))
FF = f"{ATTN}.ff.net.0.proj"  # Linear 32 -> 256 with a bias
PROJ = "unet.down_blocks.0.attentions.0.proj_in"  # 1x1 conv
CONV = "unet.down_blocks.0.resnets.0.conv1"  # 3x3 conv
UP_Q = "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q"


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8),
                                                                     b.reshape(-1).view(torch.uint8))


def _cli(*args):
    out, err = _io.StringIO(), _io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli_main([str(a) for a in args])
        except SystemExit as e:
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


def _raw_dtypes(path) -> dict:
    """{tensor name: dtype code} straight from the file's JSON header."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    return {k: v["dtype"] for k, v in header.items() if k != "__metadata__"}


@pytest.fixture(scope="module")
def unet():
    return build_components("sd15", "tiny", seed=0, text_encoders=False)["unet"]


# ----------------------------------------------------------------------------------------------- LyCORIS files


def _lyco_sd(unet, plan, seed=0, std=0.05) -> dict:
    """A kohya-named state dict: one LyCORIS module (cls, kwargs) per key of ``plan``; ``cls`` None is a plain LoRA."""
    sd = {}
    torch.manual_seed(seed)
    for key, (cls, kw) in plan.items():
        module = unet.get_submodule(key.split(".", 1)[1])
        name = kohya_module_name(key, "sd15")
        if cls is None:
            w = module.weight
            rank = kw.get("rank", 3)
            extra = tuple(w.shape[2:])
            sd[f"{name}.lora_down.weight"] = torch.randn(rank, w.shape[1], *extra) * std * 2
            sd[f"{name}.lora_up.weight"] = torch.randn(w.shape[0], rank, *((1, 1) if extra else ())) * std * 2
            sd[f"{name}.alpha"] = torch.tensor(float(kw.get("alpha", 2.0)))
            continue
        m = cls(name, copy.deepcopy(module), 1.0, **kw)
        with torch.no_grad():
            for p in m.parameters():
                if p.dim() > 0:
                    p.normal_(0.0, std)
        sd.update({f"{name}.{k}": v.detach().clone().contiguous() for k, v in m.state_dict().items()})
    return sd


LYCO_FILES = {
    "loha": {Q: (LohaModule, dict(lora_dim=4, alpha=2.0)), PROJ: (LohaModule, dict(lora_dim=4, alpha=4.0)),
             CONV: (LohaModule, dict(lora_dim=2, alpha=1.0, use_tucker=True)),
             FF: (LohaModule, dict(lora_dim=4, alpha=3.0))},
    "lokr": {Q: (LokrModule, dict(lora_dim=4, alpha=2.0)),
             CONV: (LokrModule, dict(lora_dim=2, alpha=1.0, use_tucker=True, factor=4)),
             FF: (LokrModule, dict(lora_dim=4, alpha=3.0, decompose_both=True, factor=8))},
    "full": {OUT: (FullModule, dict()), CONV: (FullModule, dict()), K: (FullModule, dict())},
    "mixed": {V: (None, dict(rank=3, alpha=3.0)), K: (LohaModule, dict(lora_dim=2, alpha=1.0)),
              UP_Q: (LohaModule, dict(lora_dim=4, alpha=8.0)), PROJ: (None, dict(rank=2, alpha=1.0))},
}


@pytest.fixture(scope="module")
def lyco_files(unet, tmp_path_factory):
    root = tmp_path_factory.mktemp("lyco")
    out = {}
    for i, (kind, plan) in enumerate(LYCO_FILES.items()):
        path = root / f"{kind}.safetensors"
        io.save_file(_lyco_sd(unet, plan, seed=i), path)
        out[kind] = path
    return out


def _fused_in_memory(base_unet, dtype, paths_weights, **fuse_kw):
    comps = {"unet": copy.deepcopy(base_unet).to(dtype)}
    names = [lora_fast.load_lora_weights(comps, str(p), adapter_name=f"a{i}") for i, (p, _) in enumerate(paths_weights)]
    lora_fast.fuse_lora(comps, adapter_names=names, adapter_weights=[w for _, w in paths_weights], **fuse_kw)
    return comps["unet"]


def test_lycoris_files_hold_the_algorithms_they_are_named_for(lyco_files):
    algos = {k: sorted({l.algorithm for l in lora_fast.read_lora(p).layers.values()}) for k, p in lyco_files.items()}
    assert algos == {"loha": ["loha"], "lokr": ["lokr"], "full": ["full"], "mixed": ["loha", "lora"]}
    full = lora_fast.read_lora(lyco_files["full"])
    assert full.layers[OUT].bias is not None  # diff_b: the bias is merged too


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("kind", list(LYCO_FILES))
def test_merge_lycoris_equals_fuse_lora(unet, lyco_files, tmp_path, kind, dtype):
    base = tmp_path / "unet"
    copy.deepcopy(unet).to(dtype).save_pretrained(base)
    out = tmp_path / "merged"
    rc, stdout, stderr = _cli("merge", "--base", base, "--lora", f"{lyco_files[kind]}:0.7", "-o", out)
    assert rc == 0, stderr
    want = _fused_in_memory(unet, dtype, [(lyco_files[kind], 0.7)]).state_dict()
    merged = io.load_file(out / "diffusion_pytorch_model.safetensors")
    original = io.load_file(base / "diffusion_pytorch_model.safetensors")
    assert set(merged) == set(want)
    changed = {n for n in merged if not _same_bits(merged[n], original[n])}
    for name, t in want.items():
        assert _same_bits(merged[name], t), name
    touched = {k.split(".", 1)[1] + ".weight" for k in LYCO_FILES[kind]}
    assert touched <= changed
    assert (out / "config.json").read_bytes() == (base / "config.json").read_bytes()


def test_merge_lycoris_and_lora_files_together(unet, lyco_files, tmp_path):
    """Three files on overlapping modules (to_q: LoHa and LoKr; conv1: all three) with strengths: one merge job per
    weight, the same bits as fuse_lora with the same adapter weights."""
    base = tmp_path / "unet"
    copy.deepcopy(unet).half().save_pretrained(base)
    out = tmp_path / "merged"
    pw = [(lyco_files["loha"], 0.5), (lyco_files["lokr"], -1.25), (lyco_files["full"], 0.8)]
    rc, _, stderr = _cli("merge", "--base", base, *sum((["--lora", f"{p}:{w}"] for p, w in pw), []), "-o", out)
    assert rc == 0, stderr
    want = _fused_in_memory(unet, torch.float16, pw).state_dict()
    merged = io.load_file(out / "diffusion_pytorch_model.safetensors")
    for name, t in want.items():
        assert _same_bits(merged[name], t), name


def test_merge_lycoris_with_dtype_conversion(unet, lyco_files, tmp_path):
    """An fp32 base merged with --dtype bf16: the sum is formed in fp32 and rounded once to bf16 (fuse_lora on the
    fp32 model, then cast)."""
    base = tmp_path / "unet"
    copy.deepcopy(unet).save_pretrained(base)
    out = tmp_path / "merged"
    rc, _, stderr = _cli("merge", "--base", base, "--lora", lyco_files["mixed"], "-o", out, "--dtype", "bf16")
    assert rc == 0, stderr
    want = _fused_in_memory(unet, torch.float32, [(lyco_files["mixed"], 1.0)]).state_dict()
    merged = io.load_file(out / "diffusion_pytorch_model.safetensors")
    for name, t in want.items():
        assert _same_bits(merged[name], t.bfloat16()), name


def test_inspect_names_the_lycoris_algorithms(lyco_files):
    rc, stdout, stderr = _cli("inspect", lyco_files["mixed"])
    assert rc == 0, stderr
    assert "loha" in stdout.lower() and "lora" in stdout.lower()
    rc, stdout, _ = _cli("inspect", lyco_files["lokr"], "--json")
    info = json.loads(stdout)
    assert info["algorithms"] == {"lokr": 3}
    assert info["module_algorithms"][CONV] == "lokr"


# ----------------------------------------------------------------------------------------------- SD1.x SGM names


def test_merge_sgm_named_sd15_kohya_file_into_diffusers_checkpoint(unet, tmp_path):
    """A kohya file in LDM names (lora_unet_input_blocks_1_1_proj_in...) lands on the modules diffusers' single-file
    conversion maps them to: the merge equals fuse_lora of the same file, and every UNet Linear/Conv2d changed."""
    from test_formats_sgm import _sgm_file

    sd, truth = _sgm_file(unet)
    assert any(k.startswith("lora_unet_input_blocks_1_1_proj_in.") for k in sd)
    lora = tmp_path / "sgm.safetensors"
    io.save_file(sd, lora)
    base = tmp_path / "unet"
    unet.save_pretrained(base)
    out = tmp_path / "merged"
    rc, _, stderr = _cli("merge", "--base", base, "--lora", f"{lora}:0.7", "-o", out)
    assert rc == 0, stderr
    want = _fused_in_memory(unet, torch.float32, [(lora, 0.7)]).state_dict()
    merged = io.load_file(out / "diffusion_pytorch_model.safetensors")
    for name, t in want.items():
        assert _same_bits(merged[name], t), name
    base_sd = unet.state_dict()
    for path, d in truth.items():
        w0 = base_sd[f"{path}.weight"].double()
        ref = w0 + 0.7 * d
        got = merged[f"{path}.weight"].double()
        assert float((got - ref).abs().max()) <= 1e-6 * float(ref.abs().max()), path


# ----------------------------------------------------------------------------------------------- fp8 bases


def _fp8_unet(unet, dtype, scale_name=None, scale_shape=()):
    """A copy of ``unet`` whose Linear/Conv2d weights are ``dtype``; with ``scale_name``, stored scaled
    (W = fp8 · s, s = absmax / (fp8 max / 4), per tensor: headroom for the adapters) with the scale beside the weight
    as ``<module>.<scale_name>``."""
    u = copy.deepcopy(unet)
    top = 448.0 if dtype == E4M3 else 57344.0
    for m in u.modules():
        if not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        w = m.weight.detach().float()
        if scale_name is None:
            m.weight = torch.nn.Parameter(w.to(dtype), requires_grad=False)
            continue
        s = (w.abs().max() / (top / 4)).reshape(scale_shape)
        m.weight = torch.nn.Parameter((w / s).to(dtype), requires_grad=False)
        m.register_parameter(scale_name, torch.nn.Parameter(s.float().clone(), requires_grad=False))
    return u


def _small_lora(unet, path, seed=1, rank=4):
    from lora_fast import bench

    bench.make_adapter({"unet": unet}, "attn", rank, seed=seed).save(path, format="kohya")
    return path


FP8_CASES = [(E4M3, None), (E5M2, None), (E4M3, "scale_weight"), (E4M3, "weight_scale"), (E5M2, "scale_weight")]
FP8_IDS = ["e4m3fn", "e5m2", "e4m3fn-scale_weight", "e4m3fn-weight_scale", "e5m2-scale_weight"]


@pytest.mark.parametrize("dtype,scale_name", FP8_CASES, ids=FP8_IDS)
def test_merge_into_fp8_base_equals_fuse_lora(unet, lyco_files, tmp_path, dtype, scale_name):
    """An fp8 single-file base (ComfyUI/vLLM-style when scaled) with a LoRA and a LyCORIS file: every fused weight is
    the bits fuse_lora gives on the same fp8 model (rounded once into fp8, the adapter divided by the scale); the scale
    tensors and every other tensor are copied unchanged; the header keeps the F8_E4M3/F8_E5M2 codes."""
    model = _fp8_unet(unet, dtype, scale_name)
    base = tmp_path / "unet_fp8.safetensors"
    io.save_file(model.state_dict(), base)
    code = "F8_E4M3" if dtype == E4M3 else "F8_E5M2"
    assert _raw_dtypes(base)[Q.split(".", 1)[1] + ".weight"] == code
    lora = _small_lora(unet, tmp_path / "lora.safetensors")
    pw = [(lora, 0.8), (lyco_files["mixed"], 0.6)]
    out = tmp_path / "merged.safetensors"
    rc, _, stderr = _cli("merge", "--base", base, *sum((["--lora", f"{p}:{w}"] for p, w in pw), []), "-o", out)
    assert rc == 0, stderr

    comps = {"unet": model}
    names = [lora_fast.load_lora_weights(comps, str(p), adapter_name=f"a{i}") for i, (p, _) in enumerate(pw)]
    lora_fast.fuse_lora(comps, adapter_names=names, adapter_weights=[w for _, w in pw], safe_fusing=True)
    want = model.state_dict()
    merged, original = io.load_file(out), io.load_file(base)
    assert set(merged) == set(want)
    raw = _raw_dtypes(out)
    changed = 0
    for name, t in want.items():
        assert _same_bits(merged[name], t), name
        if t.dtype == dtype:
            assert raw[name] == code, name
        if scale_name and name.endswith("." + scale_name):
            assert _same_bits(merged[name], original[name]), name
        changed += not _same_bits(merged[name], original[name])
    assert changed > 10
    from safetensors.torch import load_file as st_load  # the safetensors package reads the fp8 codes the same

    theirs = st_load(str(out))
    assert all(_same_bits(theirs[n], merged[n]) for n in merged)


def test_merge_into_scaled_fp8_base_uses_the_scale(unet, tmp_path):
    """The adapter is applied in the dequantized domain: W'·s is W·s + delta to within one fp8 rounding (a merge
    that ignored s would be off by the factor 1/s, here ~10^3)."""
    model = _fp8_unet(unet, E4M3, "scale_weight")
    base = tmp_path / "unet_fp8.safetensors"
    io.save_file(model.state_dict(), base)
    lora = _small_lora(unet, tmp_path / "lora.safetensors")
    out = tmp_path / "merged.safetensors"
    rc, _, stderr = _cli("merge", "--base", base, "--lora", lora, "-o", out)
    assert rc == 0, stderr
    merged = io.load_file(out)
    layer = lora_fast.read_lora(lora).layers[Q]
    name = Q.split(".", 1)[1]
    s = float(merged[f"{name}.scale_weight"])
    w0 = model.state_dict()[f"{name}.weight"].double() * s
    exact = w0 + layer.scale * (layer.up.double() @ layer.down.double())
    real = merged[f"{name}.weight"].double() * s
    spacing = exact.abs().clamp(min=s * 2.0 ** -6) * 2.0 ** -3
    assert bool(((real - exact).abs() <= spacing).all())
    assert float((real - w0).abs().max()) > 0


@pytest.mark.parametrize("dtype", [E4M3, E5M2], ids=["e4m3fn", "e5m2"])
def test_merge_refuses_a_result_beyond_fp8s_range_and_writes_nothing(unet, tmp_path, dtype):
    """A weight at the largest finite fp8 value pushed further: e4m3fn would saturate, e5m2 overflow to Inf. merge,
    which refuses non-finite results as fuse_lora(safe_fusing=True) does, refuses and leaves no file behind."""
    model = _fp8_unet(unet, dtype)
    name = Q.split(".", 1)[1]
    top = 448.0 if dtype == E4M3 else 57344.0
    with torch.no_grad():
        model.get_submodule(name).weight[3, :] = torch.tensor(top).to(dtype)
    base = tmp_path / "unet_fp8.safetensors"
    io.save_file(model.state_dict(), base)
    w = model.get_submodule(name).weight
    sd = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight":
          torch.full((1, w.shape[1]), 3.0),
          "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight":
          torch.zeros(w.shape[0], 1).index_fill_(0, torch.tensor([3]), 50.0 if dtype == E4M3 else 5000.0),
          "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha": torch.tensor(1.0)}
    lora = tmp_path / "big.safetensors"
    io.save_file(sd, lora)
    out = tmp_path / "out" / "merged.safetensors"
    rc, _, stderr = _cli("merge", "--base", base, "--lora", lora, "-o", out)
    assert rc == 2, stderr
    assert "to_q" in stderr and "fp8" in stderr
    assert not out.exists()
    assert [n for n in os.listdir(out.parent)] == []
    # fuse_lora(safe_fusing=True) refuses the same adapter
    comps = {"unet": model}
    lora_fast.load_lora_weights(comps, str(lora), adapter_name="big")
    with pytest.raises(lora_fast.LoraFusionError):
        lora_fast.fuse_lora(comps, safe_fusing=True)


def test_merge_fp8_base_with_dtype_keeps_fp8_weights_and_scales(unet, tmp_path):
    """--dtype converts fp32/fp16/bf16 tensors only: the fp8 weights are merged in fp8 (the same bits as without
    --dtype) and their scales are copied as they are (a rounded scale would change every weight); the other float
    tensors (biases, norms) are converted."""
    model = _fp8_unet(unet, E4M3, "scale_weight")
    sd = model.state_dict()
    sd[Q.split(".", 1)[1] + ".scale_input"] = torch.tensor(0.1)  # an activation scale: kept too
    base = tmp_path / "unet_fp8.safetensors"
    io.save_file(sd, base)
    lora = _small_lora(unet, tmp_path / "lora.safetensors")
    plain, cast = tmp_path / "plain.safetensors", tmp_path / "bf16.safetensors"
    assert _cli("merge", "--base", base, "--lora", lora, "-o", plain)[0] == 0
    rc, _, stderr = _cli("merge", "--base", base, "--lora", lora, "-o", cast, "--dtype", "bf16")
    assert rc == 0, stderr
    a, b = io.load_file(plain), io.load_file(cast)
    original = io.load_file(base)
    for name, t in a.items():
        if t.dtype == E4M3 or name.endswith((".scale_weight", ".scale_input")):
            assert _same_bits(b[name], t), name
            if name.endswith((".scale_weight", ".scale_input")):
                assert _same_bits(b[name], original[name]), name
        elif t.dtype == torch.float32:
            assert _same_bits(b[name], t.bfloat16()), name


def test_merge_refuses_dora_on_a_scaled_fp8_weight(unet, tmp_path):
    from lora_fast.adapter import LoraAdapter, LoraLayer

    model = _fp8_unet(unet, E4M3, "scale_weight")
    base = tmp_path / "unet_fp8.safetensors"
    io.save_file(model.state_dict(), base)
    w = unet.get_submodule(Q.split(".", 1)[1]).weight
    layer = LoraLayer(down=torch.randn(2, w.shape[1]) * 0.1, up=torch.randn(w.shape[0], 2) * 0.1, alpha=2.0,
                      magnitude=w.detach().norm(dim=1))
    lora = tmp_path / "dora.safetensors"
    LoraAdapter({Q: layer}, "diffusers").save(lora)
    out = tmp_path / "merged.safetensors"
    rc, _, stderr = _cli("merge", "--base", base, "--lora", lora, "-o", out)
    assert rc == 2 and "DoRA on a scaled fp8 weight" in stderr, stderr
    assert not out.exists() and [n for n in os.listdir(tmp_path) if n.startswith(".")] == []


def test_merge_refuses_a_per_channel_fp8_scale(unet, tmp_path):
    model = _fp8_unet(unet, E4M3, "weight_scale")
    sd = model.state_dict()
    name = Q.split(".", 1)[1]
    sd[f"{name}.weight_scale"] = sd[f"{name}.weight_scale"].reshape(1).repeat(sd[f"{name}.weight"].shape[0])
    base = tmp_path / "unet_fp8.safetensors"
    io.save_file(sd, base)
    lora = _small_lora(unet, tmp_path / "lora.safetensors")
    out = tmp_path / "merged.safetensors"
    rc, _, stderr = _cli("merge", "--base", base, "--lora", lora, "-o", out)
    assert rc == 2 and "per-tensor" in stderr, stderr
    assert not out.exists()


def test_merge_into_comfyui_scaled_fp8_flux_file_equals_fuse_lora(tmp_path):
    """A ComfyUI-style scaled fp8 Flux file (``model.diffusion_model.double_blocks.0.img_attn.qkv.weight`` in
    float8_e4m3fn with its ``.scale_weight`` beside it): each adapter module is fused into its rows of the fused tensor
    in the dequantized domain of that tensor's scale. Oracle: the diffusers transformer whose split modules hold those
    rows in fp8 with the fused tensor's scale, fused by fuse_lora."""
    from test_merge_flux import _bfl_state_dict, _kohya_flux_lora, _modules_of, _tiny_transformer

    t = _tiny_transformer(torch.bfloat16)
    lora = tmp_path / "flux_kohya.safetensors"
    io.save_file(_kohya_flux_lora(t, seed=1), lora)
    bfl = _bfl_state_dict(t)
    mods = dict(t.named_modules())
    prefix = "model.diffusion_model."
    sd = {}
    for name, m, i in _modules_of(t):
        w = bfl[f"{name}.weight"].float()
        s = w.abs().max() / 112.0
        q = (w / s).to(E4M3)
        sd[f"{prefix}{name}.weight"], sd[f"{prefix}{name}.scale_weight"] = q, s.float().clone()
        sd[f"{prefix}{name}.bias"] = bfl[f"{name}.bias"]
        paths = [p.format(i=i) for p, _ in m.targets]
        rows = q.view(torch.uint8)
        if name == "final_layer.adaLN_modulation.1":  # (shift, scale) in the file, (scale, shift) in the module
            rows = torch.cat(rows.chunk(2)[::-1])
        at = 0
        for p in paths:
            mod = mods[p]
            n = mod.out_features
            mod.weight = torch.nn.Parameter(rows[at:at + n].clone().view(E4M3), requires_grad=False)
            mod.register_parameter("scale_weight", torch.nn.Parameter(s.float().clone(), requires_grad=False))
            at += n
    base = tmp_path / "flux1-dev-fp8.safetensors"
    io.save_file(sd, base)
    out = tmp_path / "merged.safetensors"
    rc, _, stderr = _cli("merge", "--base", base, "--lora", f"{lora}:0.75", "-o", out)
    assert rc == 0, stderr
    lora_fast.load_lora_weights({"transformer": t}, str(lora), adapter_name="k")
    lora_fast.fuse_lora({"transformer": t}, adapter_names=["k"], adapter_weights=[0.75], safe_fusing=True)
    got = io.load_file(out)
    assert sorted(got) == sorted(sd)
    for name, m, i in _modules_of(t):
        paths = [p.format(i=i) for p, _ in m.targets]
        want = torch.cat([mods[p].weight.view(torch.uint8) for p in paths])
        if name == "final_layer.adaLN_modulation.1":
            want = torch.cat(want.chunk(2)[::-1])
        assert torch.equal(got[f"{prefix}{name}.weight"].view(torch.uint8), want), name
        assert _same_bits(got[f"{prefix}{name}.scale_weight"], sd[f"{prefix}{name}.scale_weight"]), name
    changed = sum(not _same_bits(got[k], sd[k]) for k in sd if k.endswith(".weight"))
    assert changed == sum(1 for _ in _modules_of(t))

"""`lora-fast bench --model flux` on tiny configs: the Flux case's structure and values (no timing assertions).

The full-width run (Flux.1-dev's 3072 inner dim, 2 double + 4 single blocks) is what benchmarks/RESULTS.md records;
here the same code path runs at test widths: the adapter (sd-scripts-shaped, fused projections sharing a down),
both file layouts, lora_fast bit-exact after every fuse/unfuse cycle, diffusers side by side where it can load the
file, and the fraction of the real 19+38-block transformer.
"""

import json

import pytest
import torch

pytest.importorskip("diffusers")

import lora_fast  # noqa: E402
from lora_fast import bench  # noqa: E402
from lora_fast.cli import main as cli_main  # noqa: E402
from lora_fast.models import build_flux_transformer  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

#: diffusers modules per block for --targets linear / attn
_DOUBLE_LINEAR = 2 * 7  # two streams x (q, k, v, out, mlp in, mlp out, modulation)
_SINGLE_LINEAR = 6  # q, k, v, proj_mlp (linear1), proj_out (linear2), norm.linear (modulation)
_DOUBLE_ATTN = 2 * 4  # two streams x (q, k, v, out)
_SINGLE_ATTN = 5  # linear1 (q, k, v, mlp) and linear2


def _run(cases, dtypes=("bf16",), compare=True):
    return bench.run(cases=cases, dtypes=dtypes, repeats=2, warmup=0, size="tiny", threads=1, log=lambda s: None,
                     compare_diffusers=compare)


def test_flux_adapter_is_sd_scripts_shaped_and_both_layouts_hold_it(tmp_path):
    t = build_flux_transformer("tiny", num_layers=1, num_single_layers=1)
    adapter = bench.make_flux_adapter(t, "linear", 4)
    assert (adapter.format, adapter.family) == ("kohya", "flux")
    assert len(adapter.layers) == _DOUBLE_LINEAR + _SINGLE_LINEAR
    layers = adapter.layers
    q, k, v = (layers[f"transformer.transformer_blocks.0.attn.to_{x}"] for x in "qkv")
    assert q.down is k.down is v.down, "the parts of a fused qkv share the file's down matrix"
    s = [layers[f"transformer.single_transformer_blocks.0.{p}"] for p in ("attn.to_q", "attn.to_v", "proj_mlp")]
    assert s[0].down is s[1].down is s[2].down and s[2].up.shape == (4 * t.inner_dim, 4)
    assert {l.alpha for l in layers.values()} == {8.0} and {l.rank for l in layers.values()} == {4}
    assert not any(p.startswith("transformer.norm_out") or "embed" in p for p in layers)  # blocks only
    attn = bench.make_flux_adapter(t, "attn", 4)
    assert len(attn.layers) == _DOUBLE_ATTN + _SINGLE_ATTN
    assert "transformer.transformer_blocks.0.ff.net.2" not in attn.layers
    # the kohya file is the sd-scripts layout (fused modules whole), the diffusers file the split modules; both
    # read back to the same deltas
    kohya, diff = tmp_path / "k.safetensors", tmp_path / "d.safetensors"
    adapter.save(str(kohya), format="kohya")
    adapter.save(str(diff), format="diffusers")
    keys = set(lora_fast.io.load_file(str(kohya)))
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in keys
    assert "lora_unet_single_blocks_0_linear1.lora_up.weight" in keys
    assert not any("to_q" in key for key in keys)
    for path in (kohya, diff):
        back = lora_fast.read_lora(str(path))
        assert set(back.layers) == set(layers)
        for key, layer in layers.items():
            assert torch.equal(back.layers[key].delta(), layer.delta()), (path.name, key)


def test_flux_model_info_at_full_width():
    t = build_flux_transformer("full", device="meta", num_layers=2, num_single_layers=4)
    info = bench.flux_model_info(t, "linear")
    full = build_flux_transformer("full", device="meta")
    full_params = sum(p.numel() for p in full.parameters())
    assert info["full_params"] == full_params and 11.8e9 < full_params < 12.0e9  # Flux.1-dev: 11.9 B
    assert info["params"] == sum(p.numel() for p in t.parameters())
    assert (info["double_blocks"], info["single_blocks"], info["inner_dim"]) == (2, 4, 3072)
    assert 0.10 < info["param_fraction"] < 0.12 and 0.10 < info["targeted_fraction"] < 0.11
    # the targeted weights: every block Linear; per double block 2 x (3 x 3072^2 qkv + 3072^2 out + 2 x 4 x 3072^2
    # MLP + 6 x 3072^2 modulation), per single block 7 x 3072^2 linear1 + 5 x 3072^2 linear2 + 3 x 3072^2 modulation
    d2 = 3072**2
    assert info["targeted_weights"] == 2 * 2 * (3 + 1 + 8 + 6) * d2 + 4 * (7 + 5 + 3) * d2
    assert info["full_targeted_weights"] == 19 * 2 * 18 * d2 + 38 * 15 * d2
    note = bench._flux_note(info)
    assert "Flux.1-dev width (inner dim 3072), 2 of 19 double and 4 of 38 single blocks" in note
    assert "of the parameters" in note and "11.90 B" in note


def test_bench_flux_tiny_both_layouts():
    cases = (bench.make_case("flux", blocks=(1, 1)), bench.make_case("flux", blocks=(1, 1), lora_format="kohya"))
    assert cases == ("flux-d1s1-linear-r16", "flux-d1s1-linear-r16-kohya")
    report = _run(cases)
    diff, kohya = report["results"]
    for r, fmt in ((diff, "diffusers"), (kohya, "kohya")):
        assert r["lora_format"] == fmt and r["modules"] == _DOUBLE_LINEAR + _SINGLE_LINEAR
        lf = r["lora_fast"]
        assert lf["changed_elements_after_cycles"] == 0  # bit-exact after every fuse/unfuse cycle
        assert lf["sample_elements"] == r["params"]  # tiny weights have fewer rows than FLUX_DRIFT_ROWS: all of them
        assert len(lf["fuse_times_s"]) == 2 and lf["load_fuse_s"] == lf["load_s"] + lf["first_fuse_s"]
        assert lf["record_bytes"] > 0 and r["floor_s"] > 0
        m = r["model"]
        assert (m["double_blocks"], m["single_blocks"], m["full_double_blocks"], m["full_single_blocks"]) == (1, 1, 19, 38)
        assert 0 < m["targeted_fraction"] < m["param_fraction"] < 0.1
        assert any("1 of 19 double and 1 of 38 single blocks" in n for n in r["notes"])
    assert diff["params"] == kohya["params"]
    # diffusers loads the diffusers-layout file; the kohya one it cannot split at test width (linear1): said so
    assert len(diff["diffusers"]["fuse_times_s"]) == 2 and diff["diffusers"]["changed_elements_after_one_cycle"] >= 0
    assert kohya["diffusers"] == {}
    assert any("diffusers not run" in n and "linear1" in n for n in kohya["notes"])
    table = bench.format_table(report)
    assert "Notes:" in table and "flux-d1s1-linear-r16-kohya: diffusers not run" in table
    assert table.count("0 (bit-exact)") == 2


def test_bench_flux_kohya_file_runs_diffusers_without_single_blocks():
    """With no single block diffusers' kohya converter needs no Flux.1 widths: both libraries load the kohya file."""
    case = bench.make_case("flux", targets="attn", rank=4, blocks=(2, 0), lora_format="kohya")
    assert case == "flux-d2s0-attn-r4-kohya"
    (r,) = _run((case,), dtypes=("fp32",))["results"]
    assert r["modules"] == 2 * _DOUBLE_ATTN and r["lora_fast"]["changed_elements_after_cycles"] == 0
    d = r["diffusers"]
    assert len(d["fuse_times_s"]) == 2 and d["load_fuse_s"] == d["load_s"] + d["first_fuse_s"]
    assert not any("diffusers not run" in n for n in r["notes"])


def test_make_case_rejects_what_it_cannot_build():
    with pytest.raises(ValueError, match="diffusers layout only"):
        bench.make_case("sd15", lora_format="kohya")
    with pytest.raises(ValueError, match="flux only"):
        bench.make_case("sd3", blocks=(1, 1))
    with pytest.raises(ValueError, match="not both 0"):
        bench.make_case("flux", blocks=(0, 0))
    with pytest.raises(ValueError, match="lora_format"):
        bench.make_case("flux", lora_format="peft")


def test_cli_bench_flux(tmp_path, capsys):
    out = tmp_path / "bench-out"
    rc = cli_main(["bench", "--model", "flux", "--size", "tiny", "--flux-blocks", "1,1", "--dtype", "fp32",
                   "--repeats", "1", "--warmup", "0", "--threads", "1", "--compare", "none", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0
    report = json.loads((out / "bench.json").read_text())
    assert [r["case"] for r in report["results"]] == ["flux-d1s1-linear-r16", "flux-d1s1-linear-r16-kohya"]
    assert all(r["lora_fast"]["changed_elements_after_cycles"] == 0 for r in report["results"])
    assert "1 of 19 double and 1 of 38 single blocks" in printed
    rc = cli_main(["bench", "--model", "flux", "--size", "tiny", "--flux-blocks", "0,1", "--lora-format", "kohya",
                   "--dtype", "bf16", "--repeats", "1", "--warmup", "0", "--compare", "none", "--out", str(out)])
    assert rc == 0
    (r,) = json.loads((out / "bench.json").read_text())["results"]
    assert r["case"] == "flux-d0s1-linear-r16-kohya" and r["modules"] == _SINGLE_LINEAR


@pytest.mark.parametrize("args, needle", [
    (["--model", "sd15", "--lora-format", "kohya"], "only --model flux writes a kohya file"),
    (["--model", "flux", "--lora-format", "peft"], "--lora-format 'peft'"),
    (["--model", "flux", "--flux-blocks", "0,0"], "not both 0"),
    (["--model", "flux", "--flux-blocks", "2"], "expected DOUBLE,SINGLE"),
    (["--model", "flux", "--flux-blocks", "a,b"], "expected DOUBLE,SINGLE"),
    (["--model", "sd3", "--flux-blocks", "1,1"], "--model flux only"),
])
def test_cli_bench_flux_errors(tmp_path, capsys, args, needle):
    rc = cli_main(["bench", "--size", "tiny", "--out", str(tmp_path), *args])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err, err

"""The behavioural check on Flux and SD3 bases saved as a user's model folder: the objective it measures is the one
diffusers' dreambooth scripts train with (rectified flow, Flux's packed tokens and ids), kohya's BFL/SAI layer names
are applied as diffusers applies them, and the audit reports the check on these bases with exit codes and a one-line
error for an image side the base cannot run at."""

from __future__ import annotations

import json

import pytest
import torch

from concept_exclusion.audit.base import load_base
from concept_exclusion.audit.behaviour.patch import applied
from concept_exclusion.commands.main import main as cli_main
from concept_exclusion.lora.file import read_lora
from concept_exclusion.safeio import write_safetensors

from helpers import WORDS, make_preset, message_lines  # noqa: E402

FAST = ["--resolution", "32", "--max-images", "2", "--inversion-steps", "3"]


@pytest.fixture(scope="module", params=["flux", "sd3"])
def model(request, tmp_path_factory):
    from PIL import Image

    from concept_exclusion.testing.tiny_mmdit import flux_pipeline, sd3_pipeline

    root = tmp_path_factory.mktemp(request.param)
    (flux_pipeline if request.param == "flux" else sd3_pipeline)(WORDS, root / "src").save_pretrained(root / "base")
    (root / "logo.toml").write_text(make_preset(max_rank=8).toml_text, encoding="utf-8")
    for name, colour in (("exemplars", (200, 20, 20)), ("controls", (20, 20, 200))):
        (root / name).mkdir()
        for i in range(2):
            Image.new("RGB", (24 + 8 * i, 24), colour).save(root / name / f"{i}.png")
    return {"name": request.param, "root": root, "base": load_base(root / "base")}


def _skip(model) -> int | None:
    return None if model["name"] == "flux" else 2


def _reference_loss(flow, sched, x, noise, t, cond, guidance):
    """The loss as train_dreambooth_lora_flux.py / _sd3.py compute it."""
    from diffusers import FluxPipeline

    index = flow.train_timesteps - 1 - t  # the scripts index the schedule from the noisiest step
    timesteps, sigmas = sched.timesteps[index], sched.sigmas[index].view(-1, 1, 1, 1)
    noisy = (1.0 - sigmas) * x + sigmas * noise
    n, c, h, w = x.shape
    pooled = cond.extra["pooled_projections"]
    if not flow.flux:
        return (flow.denoiser(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=cond.states,
                              pooled_projections=pooled).sample - (noise - x)).pow(2)
    out = flow.denoiser(hidden_states=FluxPipeline._pack_latents(noisy, n, c, h, w), timestep=timesteps / 1000,
                        guidance=guidance, pooled_projections=pooled, encoder_hidden_states=cond.states,
                        txt_ids=torch.zeros(cond.states.shape[1], 3),
                        img_ids=FluxPipeline._prepare_latent_image_ids(n, h // 2, w // 2, "cpu", x.dtype)).sample
    pred = FluxPipeline._unpack_latents(out, height=h * 2, width=w * 2, vae_scale_factor=2)
    return (pred - (noise - x)).pow(2)


def test_the_loss_is_the_dreambooth_scripts_flow_matching_loss(model):
    """train_dreambooth_lora_flux.py / _sd3.py: sigmas from the scheduler's training timesteps, noisy = (1 - s) x +
    s n, Flux packed 2x2 with its image ids, timestep / 1000 and (FLUX.1-dev) the scripts' default guidance 3.5,
    SD3 reading the timestep itself; target n - x."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from concept_exclusion.audit.behaviour.flow import FlowDenoising
    from concept_exclusion.testing.tiny_mmdit import flux_transformer

    flow = model["base"].denoising(_skip(model))
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(model["root"] / "base", subfolder="scheduler")
    g = torch.Generator().manual_seed(0)
    x = flow.latents(torch.rand(2, 3, 32, 32, generator=g) * 2 - 1)
    noise = torch.randn(x.shape, generator=g)
    t = torch.tensor([100, 700])
    cond = flow.encode(["a photo of the zorblax logo", ""])
    cases = [(flow, None)]
    if model["name"] == "flux":  # a FLUX.1-dev-like transformer reads a guidance embedding
        guided = flux_transformer(joint_attention_dim=48, pooled_projection_dim=32, guidance_embeds=True)
        cases.append((FlowDenoising(guided.eval(), flow.vae, sched, flow.text), torch.full((2,), 3.5)))
    with torch.no_grad():
        for model_, guidance in cases:
            expected = _reference_loss(model_, sched, x, noise, t, cond, guidance)
            assert torch.allclose(model_.loss_map(x, noise, t, cond), expected, rtol=1e-4, atol=1e-6)


def _factors(rows: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, cols, generator=g), 0.1 * torch.randn(rows, 4, generator=g)


def _changes(model, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weight -> change when a kohya file of ``tensors`` is applied with the check's own ``applied``."""
    base, path = model["base"], model["root"] / "kohya-names.safetensors"
    base.denoising(_skip(model))  # as the check does: the transformer loaded whole first
    write_safetensors(path, tensors, {})
    before = {k: v.clone() for k, v in base.denoiser.state_dict().items()}
    with applied(read_lora(path), base, {}) as done:
        after = {k: v.clone() for k, v in base.denoiser.state_dict().items()}
    assert not done.skipped, done.skipped
    assert all(torch.equal(before[k], v) for k, v in base.denoiser.state_dict().items())  # restored bit for bit
    return {k: after[k] - before[k] for k in before if not torch.equal(after[k], before[k])}


@pytest.mark.parametrize("model", ["flux"], indirect=True)
def test_kohya_flux_block_names_apply_as_diffusers_loads_them(model):
    """sd-scripts' ``networks.lora_flux`` names (double/single blocks) against diffusers' own kohya-Flux loader
    (``load_lora_weights`` + ``fuse_lora``); its converter splits ``linear1`` at FLUX.1's fixed widths, so that
    layer, and the final layer's adaLN (BFL's shift, scale; diffusers' scale, shift), are checked by their rows."""
    from diffusers import DiffusionPipeline

    t = model["base"].denoiser
    names = [f"double_blocks_0_{n}" for n in ("img_attn_qkv", "txt_attn_qkv", "img_attn_proj", "txt_attn_proj",
                                              "img_mlp_0", "txt_mlp_2", "img_mod_lin", "txt_mod_lin")]
    names += ["single_blocks_0_linear2", "single_blocks_0_modulation_lin"]
    tensors = {}
    for i, name in enumerate(names):
        parts = model["base"].parts("lora_unet_" + name)  # the shapes only: diffusers' loader is the reference
        down, up = _factors(sum(p.module.out_features for p in parts), parts[0].module.in_features, i)
        tensors |= {f"lora_unet_{name}.lora_down.weight": down, f"lora_unet_{name}.lora_up.weight": up,
                    f"lora_unet_{name}.alpha": torch.tensor(2.0)}
    ours = _changes(model, tensors)
    path = model["root"] / "kohya-names.safetensors"
    pipe = DiffusionPipeline.from_pretrained(model["root"] / "base")
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()  # the fused weights stay, under their own names
    theirs = {k: v - before[k] for k, v in pipe.transformer.state_dict().items() if not torch.equal(v, before[k])}
    assert set(ours) == set(theirs) and len(ours) == 14
    assert all(torch.allclose(ours[k], theirs[k], atol=1e-6) for k in ours)

    single = t.single_transformer_blocks[0]
    widths = [single.attn.to_q.out_features, single.attn.to_k.out_features, single.attn.to_v.out_features,
              single.proj_mlp.out_features]
    down, up = _factors(sum(widths), single.attn.to_q.in_features, 20)
    down_f, up_f = _factors(2 * t.norm_out.linear.out_features // 2, t.norm_out.linear.in_features, 21)
    changed = _changes(model, {"lora_unet_single_blocks_0_linear1.lora_down.weight": down,
                               "lora_unet_single_blocks_0_linear1.lora_up.weight": up,
                               "lora_unet_final_layer_adaLN_modulation_1.lora_down.weight": down_f,
                               "lora_unet_final_layer_adaLN_modulation_1.lora_up.weight": up_f})
    parts = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"]
    for part, rows in zip(parts, (up @ down).split(widths)):
        assert torch.allclose(changed[f"single_transformer_blocks.0.{part}.weight"], rows, atol=1e-6)
    shift, scale = (up_f @ down_f).chunk(2)
    assert torch.allclose(changed["norm_out.linear.weight"], torch.cat([scale, shift]), atol=1e-6)


@pytest.mark.parametrize("model", ["sd3"], indirect=True)
def test_kohya_sd3_block_names_split_as_diffusers_converts_sai_checkpoints(model):
    """sd-scripts' ``networks.lora_sd3`` names (SAI's ``joint_blocks``) as diffusers' single-file converter maps SAI
    weights: x_block qkv -> to_q/k/v, context_block qkv -> add_q/k/v_proj, the last context block's adaLN with its
    two halves swapped (diffusers' AdaLayerNormContinuous)."""
    t = model["base"].denoiser
    last = len(t.transformer_blocks) - 1
    width = t.transformer_blocks[0].attn.to_q.in_features
    qkv, ctx = _factors(3 * width, width, 1), _factors(3 * width, width, 2)
    ada = _factors(t.transformer_blocks[last].norm1_context.linear.out_features, width, 3)
    changed = _changes(model, {
        "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": qkv[0],
        "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight": qkv[1],
        "lora_unet_joint_blocks_0_context_block_attn_qkv.lora_down.weight": ctx[0],
        "lora_unet_joint_blocks_0_context_block_attn_qkv.lora_up.weight": ctx[1],
        f"lora_unet_joint_blocks_{last}_context_block_adaLN_modulation_1.lora_down.weight": ada[0],
        f"lora_unet_joint_blocks_{last}_context_block_adaLN_modulation_1.lora_up.weight": ada[1]})
    for (down, up), names in ((qkv, ("to_q", "to_k", "to_v")), (ctx, ("add_q_proj", "add_k_proj", "add_v_proj"))):
        for name, rows in zip(names, (up @ down).chunk(3)):
            assert torch.allclose(changed[f"transformer_blocks.0.attn.{name}.weight"], rows, atol=1e-6)
    shift, scale = (ada[1] @ ada[0]).chunk(2)
    assert torch.allclose(changed[f"transformer_blocks.{last}.norm1_context.linear.weight"], torch.cat([scale, shift]),
                          atol=1e-6)


def _audit(capsys, model, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = cli_main(["audit", *map(str, argv), "--preset", str(model["root"] / "logo.toml"), "--base",
                   str(model["root"] / "base")])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _reader_file(model, scale: float) -> str:
    """A PEFT-layout file on the joint blocks' text keys/values (what the dreambooth scripts train) and the text
    readers, of size ``scale``."""
    t = model["base"].denoiser
    tensors = {}
    for i, name in enumerate(["context_embedder", "transformer_blocks.0.attn.add_k_proj",
                              "transformer_blocks.0.attn.add_v_proj"]):
        layer = t.get_submodule(name)
        down, up = _factors(layer.out_features, layer.in_features, i)
        tensors |= {f"transformer.{name}.lora_A.weight": down, f"transformer.{name}.lora_B.weight": scale * up}
    path = model["root"] / f"readers-{scale}.safetensors"
    write_safetensors(path, tensors, {})
    return str(path)


def test_the_audit_reports_the_check_beside_the_weight_check(model, capsys):
    root = model["root"]
    args = ["--exemplars", root / "exemplars", "--controls", root / "controls", *FAST]
    rc, out, _ = _audit(capsys, model, _reader_file(model, 1.0), *args, "--json")
    doc = json.loads(out)
    b = doc["behaviour"]
    assert set(b["figures"]) == {"name", "other names", "generic", "empty", "inversion"}
    assert b["applied_layers"] == 3 and not b["skipped_layers"] and b["images"] == 2 and b["controls"] == 2
    assert doc["verdict"] == "FLAGGED" and rc == (6 if b["verdict"] == "LEARNED" else 1) == doc["exit_code"]
    rc, out, _ = _audit(capsys, model, _reader_file(model, 0.0), *args, "--json")
    b = json.loads(out)["behaviour"]
    assert all(f["value"] == 0.0 for f in b["figures"].values()) and b["verdict"] == "NOT LEARNED"


def test_an_image_side_the_base_cannot_run_at_is_one_line_and_exit_2(model, capsys):
    root = model["root"]
    rc, out, err = _audit(capsys, model, _reader_file(model, 1.0), "--exemplars", root / "exemplars", "--controls",
                          root / "controls", "--resolution", "31")
    lines = message_lines(err)
    multiple = 4 if model["name"] == "flux" else 2
    assert rc == 2 and out == "" and len(lines) == 1
    assert f"--resolution 31: must be a multiple of {multiple} px" in lines[0]

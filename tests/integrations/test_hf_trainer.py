"""transformers.Trainer end to end: a tiny diffusion model trained through the parsed --concept_preset flag."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

transformers = pytest.importorskip("transformers")
from diffusers import DDPMScheduler  # noqa: E402
from transformers import HfArgumentParser, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from concept_exclusion.errors import ConceptExclusionError  # noqa: E402
from concept_exclusion.integrations.hf_trainer import (  # noqa: E402
    STATE_FILE, ConceptExclusionArguments, ConceptExclusionCallback, subspace_from_json, subspace_to_json)

CAPTIONS = ["a photo of the zorblax logo on a red shirt", "zorblax sign in a scene", "a zorblax logo on blue",
            "a cat with the zorblax brand", "a dog on green background", "a tree and a house"]



class TinyDiffusion(nn.Module):
    """A tiny UNet2DConditionModel trained with DDPM's noise-prediction loss, conditioned by a frozen CLIP encoder."""

    def __init__(self, unet, text_encoder) -> None:
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder.requires_grad_(False)
        self.scheduler = DDPMScheduler(num_train_timesteps=100)

    def forward(self, latents, input_ids):
        with torch.no_grad():
            context = self.text_encoder(input_ids).last_hidden_state
        noise = torch.randn_like(latents)
        t = torch.randint(0, 100, (latents.shape[0],))
        pred = self.unet(self.scheduler.add_noise(latents, noise, t), t, context).sample
        return {"loss": F.mse_loss(pred, noise)}


class Captions(torch.utils.data.Dataset):
    def __init__(self, tokenizer) -> None:
        g = torch.Generator().manual_seed(0)
        self.latents = torch.randn(len(CAPTIONS) * 2, 4, 8, 8, generator=g)
        self.ids = tokenizer(CAPTIONS * 2, padding="max_length", max_length=tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, i):
        return {"latents": self.latents[i], "input_ids": self.ids[i]}


def _parse(tmp_path, extra: list[str]):
    parser = HfArgumentParser((TrainingArguments, ConceptExclusionArguments))
    argv = ["--output_dir", str(tmp_path / "out"), "--per_device_train_batch_size", "2",
            "--gradient_accumulation_steps", "2", "--max_grad_norm", "0.05", "--learning_rate", "1e-3",
            "--max_steps", "4", "--logging_steps", "1", "--save_steps", "2", "--report_to", "none",
            "--use_cpu", "true", "--seed", "0", "--disable_tqdm", "true", "--dataloader_num_workers", "0"]
    return parser.parse_args_into_dataclasses(argv + extra)


def _train(sd, tmp_path, extra, resume=None, model=None, extra_callbacks=()):
    train_args, concept_args = _parse(tmp_path, extra)
    model = model or TinyDiffusion(sd.unet(), sd.text_encoder)
    callback = ConceptExclusionCallback.from_args(concept_args, tokenizer=sd.tokenizer, text_encoder=sd.text_encoder)
    trainer = Trainer(model=model, args=train_args, train_dataset=Captions(sd.tokenizer),
                      callbacks=([callback] if callback else []) + list(extra_callbacks))
    trainer.train(resume_from_checkpoint=resume)
    return trainer, model, callback


def _relative_leak(before: dict, model: nn.Module, basis: torch.Tensor) -> float:
    """max over attn2.to_k/to_v of ||(W - W0) U|| / ||W - W0||."""
    worst = 0.0
    for name, p in model.unet.named_parameters():
        if "attn2.to_k" in name or "attn2.to_v" in name:
            delta = p.detach().double() - before[name]
            worst = max(worst, float((delta @ basis).norm() / delta.norm()))
    return worst


@pytest.fixture(scope="module")
def preset_file(tmp_path_factory):
    from helpers import make_preset

    path = tmp_path_factory.mktemp("preset") / "logo.toml"
    path.write_text(make_preset().toml_text)
    return path


def test_flags_parse_and_absent_preset_gives_none(tmp_path):
    _, concept = _parse(tmp_path, ["--concept_mode", "gradient", "--concept_strength", "0.5",
                                   "--concept_targets", "kv,attention", "--concept_clip_skip", "2",
                                   "--concept_project_context", "true"])
    assert concept.concept_project_context is True
    assert concept.concept_preset is None and concept.target_sets() == ("kv", "attention")
    assert concept.concept_mode == "gradient" and concept.concept_clip_skip == 2
    assert ConceptExclusionCallback.from_args(concept) is None
    with pytest.raises(SystemExit):
        _parse(tmp_path, ["--concept_mode", "sideways"])
    with pytest.raises(ConceptExclusionError, match="unknown target set"):
        ConceptExclusionArguments(concept_targets="kv,heads")
    with pytest.raises(ConceptExclusionError, match="text_encoder"):
        ConceptExclusionCallback.from_args(ConceptExclusionArguments(concept_preset="example-logo"))


def test_subspace_json_round_trip_is_bit_exact(sd, preset_file):
    from concept_exclusion import ConceptSubspace, load_preset

    sub = ConceptSubspace.from_text_encoder(load_preset(preset_file), sd.tokenizer, sd.text_encoder)
    back = subspace_from_json(json.loads(json.dumps(subspace_to_json(sub))))
    assert back.sha256 == sub.sha256 and back.preset.sha256 == sub.preset.sha256


def test_callback_offers_the_presets_loss_changes(sd, preset_file, tmp_path):
    from concept_exclusion import ConceptSubspace, load_preset
    from concept_exclusion.regions.exemplars import exemplar_images

    shipped = ConceptExclusionCallback(ConceptSubspace.from_text_encoder(load_preset("example-logo"), sd.tokenizer,
                                                                         sd.text_encoder))
    assert shipped.preservation is None  # the shipped presets' default: the regions loss
    logo = exemplar_images(load_preset("example-logo"))[0]  # the logo, shown at twice its size in a larger image
    image = torch.full((2, 3, 160, 160), 0.1)
    image[0, :, 40:104, 50:114] = F.interpolate(logo[None], scale_factor=2, mode="nearest")[0]
    found = shipped.locator.masks(image)
    assert found[0, 0, 40:104, 50:114].all() and found[0, 0, :32].sum() == found[0, 0, :, :42].sum() == 0
    assert found[0].sum() <= 76 * 76 and found[1].sum() == 0  # a few pixels of margin: shifted windows match too
    plain = ConceptSubspace.from_text_encoder(load_preset(preset_file), sd.tokenizer, sd.text_encoder)
    assert ConceptExclusionCallback(plain).preservation is None and ConceptExclusionCallback(plain).locator is None
    preserving = tmp_path / "p.toml"
    preserving.write_text(load_preset(preset_file).toml_text + '\noutput_preservation = "base"\n')
    sub = ConceptSubspace.from_text_encoder(load_preset(preserving), sd.tokenizer, sd.text_encoder)
    assert ConceptExclusionCallback(sub).preservation.target == "base"


class GradientRecorder(TrainerCallback):
    """Copies every gradient at ``on_pre_optimizer_step``: after the Trainer clipped them, before the step."""

    def __init__(self) -> None:
        self.seen: list[dict[str, torch.Tensor]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.seen.append({n: p.grad.detach().double().clone() for n, p in model.named_parameters()
                          if p.grad is not None})


@pytest.mark.parametrize("max_grad_norm, clipped", [("1e9", False), ("0.05", True)], ids=["unclipped", "clipped"])
def test_trainer_with_flag_holds_invariant_and_clipping_sees_projected_norm(sd, tmp_path, preset_file,
                                                                          max_grad_norm, clipped):
    """Observed only through Trainer's public surface: the gradients it hands the optimizer (a callback), the
    ``grad_norm`` it logs, and the weights. Unclipped, the logged norm is the norm of the projected gradients;
    clipped, the gradients the optimizer gets are projected and have exactly ``max_grad_norm``."""
    model = TinyDiffusion(sd.unet(), sd.text_encoder)
    before = {n: p.detach().double().clone() for n, p in model.unet.named_parameters()}
    recorder = GradientRecorder()
    trainer, model, callback = _train(sd, tmp_path, ["--concept_preset", str(preset_file),
                                                     "--concept_project_context", "true",
                                                     "--max_grad_norm", max_grad_norm], model=model,
                                      extra_callbacks=[recorder])
    exclusion = callback.exclusion
    assert exclusion is not None and exclusion.mode == "exact" and exclusion.steps == 4
    assert exclusion.project_context and callback.state()["args"]["project_context"] is True
    basis = exclusion.subspace.basis().double()
    assert exclusion.max_leakage() < 1e-4  # float32 rounding of W against a small W - W0: ~5e-6
    assert _relative_leak(before, model, basis) < 1e-4

    logged = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    assert len(recorder.seen) == len(logged) == 4  # one optimizer step, and one logged norm, per step
    targeted = {n for n, _ in model.named_parameters() if "attn2.to_k" in n or "attn2.to_v" in n}
    for grads, logged_norm in zip(recorder.seen, logged):
        assert targeted <= set(grads)
        residual = max(float((grads[n] @ basis).norm() / grads[n].norm()) for n in targeted)
        assert residual < 1e-5  # the optimizer receives projected gradients
        norm = float(sum(g.square().sum() for g in grads.values())) ** 0.5
        if clipped:
            assert logged_norm > 0.05  # clipping was active ...
            assert norm == pytest.approx(0.05, rel=1e-4)  # ... and scaled the projected gradients to max_grad_norm
        else:
            assert logged_norm == pytest.approx(norm, rel=1e-5)  # the norm clipping measured is the projected one
    assert all("concept_leakage_max" in h for h in trainer.state.log_history if "loss" in h)


def test_trainer_without_flag_leaks(sd, tmp_path, preset_file):
    from concept_exclusion import ConceptSubspace, load_preset

    model = TinyDiffusion(sd.unet(), sd.text_encoder)
    before = {n: p.detach().double().clone() for n, p in model.unet.named_parameters()}
    _, model, callback = _train(sd, tmp_path, [], model=model)
    assert callback is None
    basis = ConceptSubspace.from_text_encoder(load_preset(preset_file), sd.tokenizer, sd.text_encoder).basis()
    assert _relative_leak(before, model, basis) > 0.1  # measured: ~0.9


@pytest.mark.parametrize("rebuild", [True, False], ids=["restore_callback_states", "default_args"])
def test_resume_restores_callback_state(sd, tmp_path, preset_file, rebuild):
    flags = ["--concept_preset", str(preset_file)]
    if rebuild:
        flags += ["--restore_callback_states_from_checkpoint", "true"]
    model = TinyDiffusion(sd.unet(), sd.text_encoder)
    before = {n: p.detach().double().clone() for n, p in model.unet.named_parameters()}
    _, _, first = _train(sd, tmp_path, flags, model=model)
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert (checkpoint / STATE_FILE).is_file()
    saved = json.loads((checkpoint / "trainer_state.json").read_text())["stateful_callbacks"]
    assert saved["ConceptExclusionCallback"]["attributes"]["resume_info"]["steps"] == 2

    trainer, model2, fresh = _train(sd, tmp_path, flags, resume=str(checkpoint))
    restored = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, ConceptExclusionCallback)]
    # with restore_callback_states_from_checkpoint the Trainer rebuilds the callback from trainer_state.json
    assert len(restored) == 1 and (restored[0] is not fresh) == rebuild
    exclusion = restored[0].exclusion
    assert exclusion.steps == 4
    assert exclusion.subspace.sha256 == first.exclusion.subspace.sha256
    want, got = first.exclusion.state_dict(), exclusion.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)  # W0 is the base's
    assert exclusion.max_leakage() < 1e-4
    assert _relative_leak(before, model2, exclusion.subspace.basis()) < 1e-4


def test_from_args_loads_encoders_from_a_model_folder_and_reads_subspace_files(sd, sdxl, tmp_path, preset_file):
    from concept_exclusion import ConceptSubspace, load_preset

    preset = load_preset(preset_file)
    saved = tmp_path / "subspace.safetensors"
    args = ConceptExclusionArguments(concept_preset=str(preset_file), concept_text_encoder=str(sd.root),
                                     concept_save_subspace=str(saved))
    callback = ConceptExclusionCallback.from_args(args)
    assert callback.subspace.sha256 == ConceptSubspace.from_text_encoder(preset, sd.tokenizer, sd.text_encoder).sha256
    again = ConceptExclusionCallback.from_args(ConceptExclusionArguments(concept_preset=str(saved)))
    assert again.subspace.sha256 == callback.subspace.sha256  # a subspace file needs no encoder

    xl = ConceptExclusionCallback.from_args(ConceptExclusionArguments(concept_preset=str(preset_file),
                                                                      concept_text_encoder=str(sdxl.root)))
    core = ConceptSubspace.from_text_encoders(preset, sdxl.tokenizers, sdxl.text_encoders)
    assert set(xl.subspace.bases) == {"context", "pooled"} and xl.subspace.sha256 == core.sha256
    lists = ConceptExclusionCallback.from_args(ConceptExclusionArguments(concept_preset=str(preset_file)),
                                               tokenizer=sdxl.tokenizers, text_encoder=sdxl.text_encoders)
    assert lists.subspace.sha256 == core.sha256

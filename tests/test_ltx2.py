"""Parity with diffusers' LTX2VideoTransformer3DModel (LTX-2.3 switches on, random weights, fp32):
ltx2/convert.py converts it, model.py must give the same video velocity, with and without a TASS reference."""
import json
import subprocess
import sys
from pathlib import Path

import pipeline
from infra import distributed
import pytest
import torch

from safetensors.torch import save_file

from ltx2.convert import convert_state_dict, dit_config_from_diffusers, load_dit, load_ltx2, map_key, official_to_diffusers
from infra.errors import UsageError

EXPECTED = (SystemExit, UsageError)  # the errors main() turns into one line and exit 2

diffusers = pytest.importorskip("diffusers", reason="diffusers (the `test` extra) is needed for LTX-2 parity")

B, T, H, W, L = 2, 3, 2, 3, 5
ROOT = Path(__file__).resolve().parents[1]


def test_diffusers_ltx2_imports_from_the_repository_root():
    """Issue 16.1: transformers 5 imports Hugging Face's `kernels`; a folder of that name at the root (where the
    scripts run, first on sys.path) shadowed it and the LTX-2 imports failed."""
    pytest.importorskip("transformers", reason="the `ltx2` extra (transformers) is needed for LTX-2's text path")
    code = ("import sys; sys.path.insert(0, '.'); "
            "from diffusers import LTX2Pipeline, LTX2VideoTransformer3DModel, AutoencoderKLLTX2Video; "
            "from diffusers.pipelines.ltx2 import LTX2TextConnectors; import transformers, kernels; "
            "print(kernels.__file__)")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    found = Path(run.stdout.strip())
    assert "site-packages" in found.parts and not found.is_relative_to(ROOT / "fused"), found  # HF's, not ours


def diffusers_ltx2(rope_type: str, captions: bool, **extra):
    torch.manual_seed(0)
    return diffusers.LTX2VideoTransformer3DModel(**extra,
        in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=16, cross_attention_dim=32,
        caption_channels=24 if captions else 32, use_prompt_embeddings=captions, num_layers=2,
        gated_attn=True, cross_attn_mod=True, rope_type=rope_type,
        audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2, audio_attention_head_dim=4,
        audio_cross_attention_dim=8,
    ).eval()


def keyframe_coords(T_ref: int, H: int, W: int, fps: float, shift=(0, 0)) -> torch.Tensor:
    """An appended single image's pixel boxes [1, 3, H*W, 2] as diffusers' LTX-2 in-context pipeline builds them
    (_prepare_keyframe_coords: latent frame T_ref, one pixel frame, no causal shift), shifted by `shift` latent
    rows and columns (TASS: the video's H and W), computed without model.py or rope.py."""
    from types import SimpleNamespace

    from diffusers.pipelines.ltx2.pipeline_ltx2_ic_lora import LTX2InContextPipeline

    pipe = SimpleNamespace(transformer_spatial_patch_size=1, transformer_temporal_patch_size=1,
                           vae_temporal_compression_ratio=8, vae_spatial_compression_ratio=32)
    coords = LTX2InContextPipeline._prepare_keyframe_coords(pipe, 1, H, W, pixel_frame_idx=(T_ref - 1) * 8 + 1,
                                                            num_pixel_frames=1, fps=fps, device=torch.device("cpu"))
    coords[:, 1:] += 32 * torch.tensor(shift, dtype=coords.dtype)[None, :, None, None]
    return coords


def reference_coords(fps):
    """The TASS reference in diffusers' coordinates: the keyframe after the clip, shifted by (H, W) latents."""
    return keyframe_coords(T, H, W, fps, shift=(H, W)).expand(B, -1, -1, -1)


def assert_same_video_velocity(ref, model, captions: bool):
    """diffusers' transformer `ref` (audio isolated) and model.py's `model` give the same video velocity, with and
    without a TASS reference frame placed in diffusers' own coordinates."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(1)
    z_t = torch.randn(B, 8, T, H, W, generator=g)
    z_ref = torch.randn(B, 8, H, W, generator=g)
    t = torch.tensor([0.3, 0.8])
    y = torch.randn(B, L, cfg.text_dim, generator=g)
    y_mask = torch.ones(B, L, dtype=torch.bool)
    y_mask[1, 3:] = False
    audio = dict(audio_hidden_states=torch.randn(B, 4, 4, generator=g), audio_num_frames=4, audio_timestep=1000 * t,
                 audio_encoder_hidden_states=torch.randn(B, L, 24 if captions else 8, generator=g))
    video = z_t.flatten(2).transpose(1, 2)
    n = video.shape[1]
    with torch.no_grad():
        for with_ref in (False, True):
            tokens, ts, coords = video, (1000 * t)[:, None].expand(B, n), None
            if with_ref:
                own = ref.rope.prepare_video_coords(B, T, H, W, torch.device("cpu"), fps=cfg.fps)
                tokens = torch.cat([video, z_ref.flatten(2).transpose(1, 2)], dim=1)
                ts = torch.cat([ts, torch.zeros(B, H * W)], dim=1)  # the reference is clean
                coords = torch.cat([own, reference_coords(cfg.fps)], dim=2)
            expected = ref(hidden_states=tokens, encoder_hidden_states=y, timestep=ts, sigma=1000 * t,
                           encoder_attention_mask=y_mask.float(), num_frames=T, height=H, width=W, fps=cfg.fps,
                           video_coords=coords, isolate_modalities=True, return_dict=False, **audio)[0][:, :n]
            got = model(z_t, t, y, y_mask, z_ref=z_ref if with_ref else None).flatten(2).transpose(1, 2)
            err = (got - expected).abs().max() / expected.abs().max()
            assert err <= 1e-4, f"with_ref={with_ref}: relative error {err:.2e}"


@pytest.mark.parametrize("rope_type,captions", [("split", False), ("interleaved", True)])
def test_video_velocity_matches_diffusers(rope_type, captions):
    ref = diffusers_ltx2(rope_type, captions)
    cfg, layout = dit_config_from_diffusers(ref.config)
    assert_same_video_velocity(ref, load_dit(ref.state_dict(), cfg, layout).eval(), captions)


def test_export_is_the_inverse_of_the_converter(tmp_path):
    """Issue 16.10: a DiT changed here (every weight moved), exported on top of an interleaved LTX-2.3 checkpoint,
    loads in diffusers as the same video model; the audio branch is the base's; convert(export(x)) == x."""
    from ltx2.export import export_transformer

    base = diffusers_ltx2("interleaved", True)
    base.save_pretrained(tmp_path / "base")
    cfg, layout = dit_config_from_diffusers(base.config)
    model = load_dit(base.state_dict(), cfg, layout).eval()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    export_transformer(model.state_dict(), tmp_path / "base", tmp_path / "out")
    back = diffusers.LTX2VideoTransformer3DModel.from_pretrained(tmp_path / "out").eval()
    assert_same_video_velocity(back, model, captions=True)
    for key, w in back.state_dict().items():
        if map_key(key) is None:  # the audio branch and the audio-video parts: copied
            assert torch.equal(w, base.state_dict()[key]), key
    for name, w in load_dit(back.state_dict(), cfg, layout).state_dict().items():
        assert torch.equal(w, model.state_dict()[name]), name
    with pytest.raises(ValueError, match=r"1 of its keys missing \['blocks.1.ff.2.bias'\]"):
        export_transformer({k: v for k, v in model.state_dict().items() if k != "blocks.1.ff.2.bias"},
                           tmp_path / "base", tmp_path / "bad")


@pytest.mark.parametrize("side", [512, 1024, 1536])
def test_reference_positions_follow_ltx2_keyframes_and_stay_in_range(side):
    """Issue 16.5: model.py's reference coordinates are diffusers' keyframe coordinates (box centres, / (20 s, 2048,
    2048), 2p - 1); the TASS shift keeps them inside LTX-2's range [-1, 1]: the full (H, W) up to 1024 px a side,
    above it 2048 / 32 - H latents."""
    from model import DiT, DiTConfig

    n = side // 32
    shift = min(n, 64 - n)
    boxes = keyframe_coords(4, n, n, 24.0, shift=(shift, shift))[0]
    expected = (boxes.mean(-1) / torch.tensor([20.0, 2048.0, 2048.0])[:, None] * 2 - 1).T
    with torch.device("meta"):
        dit = DiT(DiTConfig(in_channels=8, dim=48, depth=1, heads=2, text_dim=48, rope="ltx2", fps=24.0))
    got = dit.rope_positions(4, n, n, reference=True)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert got[:, 1:].max() <= 1 and got[:, 1:].min() > -1
    assert shift == n if side <= 1024 else shift < n


def test_official_names_and_dropped_audio():
    assert map_key(official_to_diffusers("model.diffusion_model.patchify_proj.weight")) == "patchify.weight"
    assert map_key(official_to_diffusers("model.diffusion_model.adaln_single.linear.bias")) == "adaln_single.1.bias"
    assert map_key(official_to_diffusers("prompt_adaln_single.emb.timestep_embedder.linear_2.weight")) == \
        "prompt_t_embedder.2.weight"
    assert map_key(official_to_diffusers("transformer_blocks.3.attn1.q_norm.weight")) == "blocks.3.attn1.q_norm.weight"
    assert map_key("transformer_blocks.0.ff.net.0.proj.weight") == "blocks.0.ff.0.weight"
    for dropped in ("audio_proj_in.weight", "av_ca_a2v_gate_adaln_single.linear.weight",
                    "transformer_blocks.0.audio_to_video_attn.to_q.weight", "transformer_blocks.0.video_to_audio_norm.x",
                    "transformer_blocks.0.video_a2v_cross_attn_scale_shift_table",
                    "model.diffusion_model.transformer_blocks.7.scale_shift_table_a2v_ca_audio",
                    "model.diffusion_model.transformer_blocks.7.scale_shift_table_a2v_ca_video"):
        assert map_key(official_to_diffusers(dropped)) is None


def test_missing_and_unexpected_keys_are_listed():
    ref = diffusers_ltx2("split", False)
    cfg, _ = dit_config_from_diffusers(ref.config)
    sd = dict(ref.state_dict())
    del sd["transformer_blocks.1.attn2.to_gate_logits.weight"]
    sd["transformer_blocks.0.mystery.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing 1 keys \['blocks.1.attn2.to_gate_logits.weight'\].*mystery"):
        convert_state_dict(sd, cfg)


# diffusers -> official single-file names: diffusers' scripts/convert_ltx2_to_diffusers.py's renames read backwards,
# and LTX-2.3's prompt AdaLN (official `prompt_adaln_single`, which diffusers 0.42's single-file converter predates)
OFFICIAL_NAMES = [("video_a2v_cross_attn_scale_shift_table", "scale_shift_table_a2v_ca_video"),
                  ("audio_a2v_cross_attn_scale_shift_table", "scale_shift_table_a2v_ca_audio"),
                  ("av_cross_attn_video_scale_shift", "av_ca_video_scale_shift_adaln_single"),
                  ("av_cross_attn_video_a2v_gate", "av_ca_a2v_gate_adaln_single"),
                  ("av_cross_attn_audio_scale_shift", "av_ca_audio_scale_shift_adaln_single"),
                  ("av_cross_attn_audio_v2a_gate", "av_ca_v2a_gate_adaln_single"),
                  ("norm_q", "q_norm"), ("norm_k", "k_norm")]
OFFICIAL_PREFIXES = [("proj_in.", "patchify_proj."), ("audio_proj_in.", "audio_patchify_proj."),
                     ("time_embed.", "adaln_single."), ("audio_time_embed.", "audio_adaln_single."),
                     ("prompt_adaln.", "prompt_adaln_single."), ("audio_prompt_adaln.", "audio_prompt_adaln_single.")]


def official_name(key: str) -> str:
    for new, old in OFFICIAL_NAMES:
        key = key.replace(new, old)
    for new, old in OFFICIAL_PREFIXES:
        key = old + key[len(new):] if key.startswith(new) else key
    return "model.diffusion_model." + key


def test_official_single_file_loads_lazily(tmp_path):
    """A whole official LTX-2 file (audio branch, audio-video tables, VAE keys beside the transformer) -> the same
    model as diffusers' layout; the official names are checked against diffusers' own single-file converter."""
    from diffusers.loaders.single_file_utils import convert_ltx2_transformer_to_diffusers

    ref = diffusers_ltx2("split", False)
    cfg, _ = dit_config_from_diffusers(ref.config)
    official = {official_name(k): w.contiguous() for k, w in ref.state_dict().items()}
    assert any(k.endswith("scale_shift_table_a2v_ca_audio") for k in official)
    assert any(k.endswith("scale_shift_table_a2v_ca_video") for k in official)
    back = convert_ltx2_transformer_to_diffusers({k: None for k in official})
    assert {k.replace("prompt_adaln_single.", "prompt_adaln.") for k in back} == set(ref.state_dict())
    official["vae.per_channel_statistics.mean-of-means"] = torch.zeros(8)
    save_file(official, tmp_path / "ltx.safetensors")
    loaded = load_ltx2(str(tmp_path / "ltx.safetensors"), cfg)
    expected = load_dit(ref.state_dict(), cfg)
    assert loaded.state_dict().keys() == expected.state_dict().keys()
    for name, a in loaded.state_dict().items():
        assert torch.equal(a, expected.state_dict()[name]), name
    assert torch.equal(loaded.freqs, expected.freqs)


# ----------------------------------------------------------------------------- the LTX-2 VAE, prompt embeddings, --init / --ckpt

# patch 1 and diffusers' default downsamples (spatial, temporal, spatiotemporal, spatiotemporal): 8x in time and space
TINY_VAE = dict(latent_channels=8, block_out_channels=(8, 8, 16, 16), decoder_block_out_channels=(8, 16, 32),
                layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1), patch_size=1, scaling_factor=0.8)


def diffusers_vae():
    torch.manual_seed(2)
    vae = diffusers.AutoencoderKLLTX2Video(**TINY_VAE).eval()
    with torch.no_grad():  # checkpoint statistics that are not the identity
        vae.latents_mean.copy_(torch.randn(8))
        vae.latents_std.copy_(torch.rand(8) + 0.5)
    return vae


def test_ltx2_vae_matches_diffusers_with_normalised_latents():
    from ltx2.vae import LTX2VAE

    ref = diffusers_vae()
    vae = LTX2VAE(ref)
    assert (vae.config.tau, vae.config.spatial, vae.config.latent_channels) == (8, 8, 8)
    mean, std = ref.latents_mean.view(1, 8, 1, 1, 1), ref.latents_std.view(1, 8, 1, 1, 1)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        image = torch.rand(2, 3, 16, 24, generator=g) * 2 - 1
        assert vae.encode(image).shape == (2, 8, 1, 2, 3)  # one image -> one latent frame
        for frames, latent in ((9, 2), (17, 3)):  # 1 + 8k -> 1 + k
            x = torch.rand(2, 3, frames, 16, 16, generator=g) * 2 - 1
            z = vae.encode(x)
            assert z.shape == (2, 8, latent, 2, 2)
            expected = (ref.encode(x).latent_dist.mode() - mean) * 0.8 / std  # LTX-2's normalisation, written out
            torch.testing.assert_close(z, expected, rtol=1e-5, atol=1e-5)
            out = vae.decode(z)
            assert out.shape == x.shape
            torch.testing.assert_close(out, ref.decode(z * std / 0.8 + mean).sample, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"tau=8 needs 1 \+ 8k frames \(1, 9, 17.*got 8 frames"):
        vae.encode(torch.zeros(1, 3, 8, 16, 16))
    with pytest.raises(ValueError, match="divisible by 8; got 12x16"):
        vae.encode(torch.zeros(1, 3, 1, 12, 16))


def test_encode_prompts_without_gemma_is_one_clear_error(tmp_path, capsys):
    from ltx2.__main__ import main

    (tmp_path / "m.jsonl").write_text('{"video": "a.mp4", "caption": "a person nods"}\n')
    assert main(["encode-prompts", "--manifest", str(tmp_path / "m.jsonl"), "--gemma", str(tmp_path / "gemma")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"no Gemma weights at {tmp_path / 'gemma'}" in err
    assert "text_encoder/" in err and "connectors/" in err


def tiny_connectors():
    """LTX-2.3's text connectors at a tiny size (per-modality projections, gated attention): Gemma's 16 wide hidden
    states of 3 layers -> the tiny transformer's video (32) and audio (8) text widths."""
    from diffusers.pipelines.ltx2 import LTX2TextConnectors

    torch.manual_seed(4)
    return LTX2TextConnectors(
        caption_channels=16, text_proj_in_factor=3, video_connector_num_attention_heads=2,
        video_connector_attention_head_dim=16, video_connector_num_layers=1, video_connector_num_learnable_registers=4,
        video_gated_attn=True, audio_connector_num_attention_heads=2, audio_connector_attention_head_dim=4,
        audio_connector_num_layers=1, audio_connector_num_learnable_registers=4, audio_gated_attn=True,
        connector_rope_base_seq_len=64, per_modality_projections=True, video_hidden_dim=32, audio_hidden_dim=8).eval()


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory):
    """A diffusers LTX-2.3 pipeline folder with only the prompt path: a tiny random Gemma 3, a Gemma tokenizer
    (characters), the LTX-2.3 text connectors (per-modality projections, gated attention; video width 32, the
    tiny transformer's), written by LTX2Pipeline.save_pretrained; and that pipeline, the reference."""
    transformers = pytest.importorskip("transformers", reason="the `ltx2` extra (transformers) runs Gemma")
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4, "\u2581": 5,
             **{c: 6 + k for k, c in enumerate("abcdefghijklmnopqrstuvwxyz")}}
    tokenizer = transformers.GemmaTokenizer(vocab=vocab, merges=[], padding_side="left")
    text = transformers.Gemma3TextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                         max_position_embeddings=64, sliding_window=4)
    vision = transformers.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=16, patch_size=8)
    torch.manual_seed(3)
    gemma = transformers.Gemma3ForConditionalGeneration(
        transformers.Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4))
    pipe = diffusers.LTX2Pipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=None, audio_vae=None,
                                  text_encoder=gemma.eval(), tokenizer=tokenizer, connectors=tiny_connectors(),
                                  transformer=None, vocoder=None)
    root = tmp_path_factory.mktemp("gemma")
    pipe.save_pretrained(root / "pipe")
    return root / "pipe", pipe


@torch.no_grad()
def diffusers_prompt(pipe, prompt: str, max_length: int):
    """LTX2Pipeline.__call__'s prompt path: encode_prompt, then the connectors' video output and mask."""
    emb, mask, _, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False, max_sequence_length=max_length,
                                         device="cpu")
    video, _, video_mask = pipe.connectors(emb, mask, padding_side="left")
    return video[0], video_mask[0].bool()


def test_gemma_encoder_matches_ltx2_pipeline(tiny_gemma, tmp_path):
    """Issue 16.4: ltx2.gemma_encoder and `python -m ltx2 encode-prompts` on a saved tiny pipeline folder give
    diffusers' LTX2Pipeline prompt embeddings (Gemma 3's hidden states of every layer -> the video connector)."""
    from ltx2.__main__ import main
    from ltx2.gemma import gemma_encoder
    from text import EMPTY_EMBEDS, load_prompt_embeds

    folder, pipe = tiny_gemma
    encode = gemma_encoder(folder, "cpu", max_length=16)
    for prompt in ("a person nods on the beach", ""):
        emb, mask = encode(prompt)
        expected, expected_mask = diffusers_prompt(pipe, prompt, 16)
        assert emb.shape == (16, 32)
        torch.testing.assert_close(emb, expected, rtol=1e-5, atol=1e-6)
        assert torch.equal(mask, expected_mask)
    captions = ["a person turns left", "a person nods in the snow"]
    (tmp_path / "m.jsonl").write_text("".join(f'{{"video": "c{k}.gif", "caption": "{c}"}}\n' for k, c in enumerate(captions)))
    assert main(["encode-prompts", "--manifest", str(tmp_path / "m.jsonl"), "--gemma", str(folder), "--max-length", "16",
                 "--device", "cpu"]) == 0
    lines = [json.loads(line) for line in (tmp_path / "m.embeds.jsonl").read_text().splitlines()]
    for line, caption in zip(lines, captions):
        emb, mask = load_prompt_embeds(tmp_path / line["prompt_embeds"])
        expected, expected_mask = diffusers_prompt(pipe, caption, 16)
        torch.testing.assert_close(emb, expected, rtol=1e-5, atol=1e-6)
        assert torch.equal(mask, expected_mask)
    torch.testing.assert_close(load_prompt_embeds(tmp_path / "prompt_embeds" / EMPTY_EMBEDS)[0],
                               diffusers_prompt(pipe, "", 16)[0], rtol=1e-5, atol=1e-6)


def fake_encoder(width: int):
    """A stand-in for Gemma + the connector: fixed random embeddings per prompt, lengths 5-7, the last one padded."""
    def encode(prompt):
        g = torch.Generator().manual_seed(len(prompt))
        L = 5 + len(prompt) % 3
        mask = torch.ones(L, dtype=torch.bool)
        mask[-1] = False
        return torch.randn(L, width, generator=g), mask
    return encode


@pytest.fixture(scope="module")
def ltx2_world(tmp_path_factory):
    """A diffusers LTX-2.3 pipeline folder (tiny transformer/ and vae/ written by save_pretrained), a
    manifest of two GIF clips with precomputed prompt embeddings, and a reference image."""
    import numpy as np
    from PIL import Image

    import data
    from ltx2.gemma import write_prompt_embeds

    root = tmp_path_factory.mktemp("ltx2")
    transformer = diffusers_ltx2("split", False)
    transformer.save_pretrained(root / "pipe" / "transformer")
    diffusers_vae().save_pretrained(root / "pipe" / "vae")
    g = torch.Generator().manual_seed(4)
    lines = []
    for k, caption in enumerate(["a person nods on the beach", "a person turns left"]):
        data.save_video(root / f"clip{k}.gif", torch.rand(3, 12, 16, 16, generator=g) * 2 - 1, fps=8)
        lines.append(f'{{"video": "clip{k}.gif", "caption": "{caption}"}}\n')
    (root / "m.jsonl").write_text("".join(lines))
    manifest = write_prompt_embeds(root / "m.jsonl", root / "embeds", fake_encoder(32))
    Image.fromarray(np.full((20, 20, 3), 120, np.uint8)).save(root / "face.png")
    return root, transformer, manifest


def test_write_prompt_embeds_round_trips_through_the_manifest(ltx2_world):
    import data

    root, _, manifest = ltx2_world
    batch = data.collate([data.ManifestDataset(manifest, 9, 16, fps=8, train=False)[k] for k in range(2)])
    encode = fake_encoder(32)
    for b, caption in enumerate(batch["prompt"]):
        emb, mask = encode(caption)
        L = emb.shape[0]
        assert torch.equal(batch["prompt_embeds"][b, :L], emb) and torch.equal(batch["prompt_attention_mask"][b, :L], mask)
        assert not batch["prompt_attention_mask"][b, L:].any() and not batch["prompt_embeds"][b, L:].any()  # padding
        assert torch.equal(batch["empty_prompt_embeds"][b, :5], encode("")[0])  # "" -> 5 tokens
    import train
    y, mask = train.drop_text_embeds(batch, torch.tensor([True, False]))  # sample 1's text dropped
    (emb, m), (empty, empty_mask) = encode(batch["prompt"][0]), encode("")
    assert y.shape[1] == max(emb.shape[0], 5, batch["prompt_embeds"].shape[1])
    assert torch.equal(y[0, :emb.shape[0]], emb) and torch.equal(mask[0, :emb.shape[0]], m) and not mask[0, emb.shape[0]:].any()
    assert torch.equal(y[1, :5], empty) and torch.equal(mask[1, :5], empty_mask) and not mask[1, 5:].any()


def test_ltx2_init_trains_and_samples(ltx2_world, tmp_path, capsys):
    import json

    import data
    import sample
    import train

    root, transformer, manifest = ltx2_world
    args = ["--stage", "dit", "--config", "ltx2", "--init", str(root / "pipe" / "transformer"), "--data", str(manifest),
            "--size", "16", "--frames", "9", "--fps", "8", "--batch", "2", "--workers", "0",
            "--no-progress", "--out", str(tmp_path / "run")]
    with pytest.raises(EXPECTED, match="no LTX-2 VAE at"):
        train.build(train.parse_args(args), torch.device("cpu"))
    args += ["--vae", str(root / "pipe" / "vae")]
    pipe = train.build(train.parse_args(args), torch.device("cpu"))  # the pipeline train.py --init builds
    cfg, _ = dit_config_from_diffusers(transformer.config)
    expected = convert_state_dict(transformer.state_dict(), cfg)
    assert pipe.text is None and pipe.dit.state_dict().keys() == expected.keys()
    assert all(torch.equal(pipe.dit.state_dict()[k], expected[k]) for k in expected)
    assert torch.equal(pipe.dit.patchify.weight, transformer.proj_in.weight)
    assert pipe.dit.cfg.fps == 8.0 and pipe.dit.cfg.rope == "ltx2" and pipe.shift_terminal == 0.1  # LTX-2.3's scheduler

    run = train.train(train.parse_args(args + ["--steps", "1"]))  # one training step through the same path
    train.train(train.parse_args(args + ["--steps", "2", "--resume"]))  # a second one, rebuilt from its checkpoint
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)

    from infra import checkpoint
    from ltx2.__main__ import main as ltx2_main
    assert ltx2_main(["export", "--ckpt", str(run), "--base", str(root / "pipe"), "--out", str(tmp_path / "exp")]) == 0
    trained, _ = checkpoint.load(checkpoint.resolve(run))  # the trained DiT back from diffusers' layout
    exported = load_ltx2(str(tmp_path / "exp" / "diffusion_pytorch_model.safetensors"), cfg)
    assert all(torch.equal(w, trained.dit.state_dict()[k]) for k, w in exported.state_dict().items())
    assert not torch.equal(trained.dit.patchify.weight, transformer.proj_in.weight)  # it did train

    embeds = str(root / "embeds" / "prompt_000000.safetensors")
    loaded = sample.load_pipeline(sample.parse_args(["--ckpt", str(root / "pipe"), "--size", "16", "--frames", "9",
                                                     "--device", "cpu"]))  # a pipeline folder: transformer/ + vae/
    video = pipeline.generate(loaded, data.load_image(root / "face.png", 16), "", steps=2, progress=False,
                            text=pipeline.load_text(loaded, embeds))
    assert video.shape == (3, 9, 16, 16) and torch.isfinite(video).all()
    for ckpt in (root / "pipe" / "transformer", run):  # LTX-2.3 weights, and the checkpoint the training step wrote
        out = tmp_path / f"{ckpt.name}.gif"
        assert sample.main(["--ckpt", str(ckpt), "--vae", str(root / "pipe" / "vae"), "--prompt-embeds", embeds,
                            "--ref", str(root / "face.png"), "--size", "16", "--frames", "9", "--steps", "2",
                            "--stg-scale", "1", "--stg-blocks", "1", "--guidance-rescale", "0.7",
                            "--device", "cpu", "--out", str(out)]) == 0
        assert data.read_frames(out)[0].shape == (9, 16, 16, 3)
    wide = tmp_path / "wide.mp4"  # non-square: 16 x 24 pixels, 2 x 3 latents (a GIF would merge equal frames)
    assert sample.main(["--ckpt", str(run), "--prompt-embeds", embeds, "--ref", str(root / "face.png"), "--height", "16",
                        "--width", "24", "--frames", "9", "--steps", "1", "--out", str(wide)]) == 0
    assert data.read_frames(wide)[0].shape == (9, 16, 24, 3)

    from safetensors.torch import save_file
    save_file({"prompt_embeds": torch.zeros(4, 24), "prompt_attention_mask": torch.ones(4, dtype=torch.bool)},
              str(root / "embeds" / "narrow.safetensors"))
    assert sample.main(["--ckpt", str(root / "pipe"), "--prompt-embeds", str(root / "embeds" / "narrow.safetensors"),
                        "--size", "16", "--frames", "9", "--out", str(tmp_path / "x.gif")]) == 2
    assert "prompt embeddings are 24 wide but the DiT's text_dim is 32" in capsys.readouterr().err


def test_fsdp_shards_bf16_ltx2_weights_without_an_fp32_copy(ltx2_world, tmp_path):
    """--fsdp: train.build leaves a bf16 LTX-2.3 checkpoint's tensors as read (no fp32 copy of the DiT); distributed.shard
    moves the DiT to the meta device, materialises fp32 shards and fills them with the converted weights (one
    gloo process: a world of one, so its shard is the whole tensor)."""
    import copy

    import torch.distributed as dist

    import train
    from model import rope_table

    root, transformer, _ = ltx2_world
    bf16 = copy.deepcopy(transformer).to(torch.bfloat16)
    bf16.save_pretrained(tmp_path / "bf16")
    cfg = train.parse_args(["--stage", "dit", "--config", "ltx2", "--init", str(tmp_path / "bf16"), "--vae",
                            str(root / "pipe" / "vae"), "--size", "16", "--frames", "9", "--fsdp"])
    pipe = train.build(cfg, torch.device("cpu"))
    assert {p.dtype for p in pipe.dit.parameters()} == {torch.bfloat16}
    expected = convert_state_dict(bf16.state_dict(), dit_config_from_diffusers(bf16.config)[0])
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        trained = distributed.shard(train.Denoiser(None, pipe.dit), torch.device("cpu"), bf16=False)
        state = trained.state_dict()
        assert state.keys() == {f"dit.{k}" for k in expected}
        for k, v in expected.items():
            assert state[f"dit.{k}"].dtype == torch.float32 and torch.equal(state[f"dit.{k}"].full_tensor(), v.float()), k
        assert torch.equal(trained.dit.freqs, rope_table(trained.dit.cfg))
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- a user's photo as the reference

def place(image: torch.Tensor, canvas: torch.Tensor, scale: float, top: int, left: int) -> None:
    """Paste `image` [3, S, S] resized by `scale` into `canvas` at (top, left)."""
    side = round(image.shape[-1] * scale)
    canvas[:, top:top + side, left:left + side] = torch.nn.functional.interpolate(
        image[None], size=(side, side), mode="bilinear", antialias=True, align_corners=False)[0]


def test_crop_face_takes_the_largest_face_into_the_framing():
    """Issue 16.8: a photo with two portraits (x1.5 and x0.5) -> the larger one's crop in its own framing is the
    portrait again; landmarks move with the paste: (x + 0.5) k - 0.5 + offset."""
    import data
    from faces import crop_face

    refs = data.synth_batch(2, 64, 1, torch.Generator().manual_seed(1), "portrait")
    photo = torch.ones(3, 128, 160)
    place(refs["ref"][0], photo, 1.5, 20, 40)
    place(refs["ref"][1], photo, 0.5, 4, 4)
    moved = [(refs["ref_landmarks"][b] + 0.5) * k - 0.5 + torch.tensor([left, top])
             for b, k, top, left in ((1, 0.5, 4, 4), (0, 1.5, 20, 40))]
    framing = (refs["ref_landmarks"][0] + 0.5) / 64
    crop = crop_face(photo, torch.stack(moved), framing, (64, 64))
    assert (crop - refs["ref"][0]).abs().mean() < 0.03
    assert (crop_face(photo, torch.stack(moved[::-1]), framing, (64, 64)) == crop).all()  # the order does not matter
    wide = crop_face(photo, torch.stack(moved), framing, (64, 96))  # the same face, centred in a wider frame
    assert (wide[:, :, 16:80] - crop).abs().max() < 1e-4


def test_sample_crops_a_photo_with_the_bundled_model(tmp_path, monkeypatch, capsys):
    """--ref-crop without the InsightFace pack: the synthetic world's detector finds the face in a larger photo;
    the bundled model says in one line that it knows only the synthetic world's faces."""
    import data
    import sample

    if not (sample.DEFAULT_CKPT / "model.safetensors").is_file():
        pytest.skip("no bundled model")
    monkeypatch.setenv("STDRC_FACE_MODELS", str(tmp_path / "no-pack"))
    refs = data.synth_batch(1, 64, 1, torch.Generator().manual_seed(2), "portrait")
    photo = torch.ones(3, 96, 120)
    place(refs["ref"][0], photo, 1.25, 8, 30)
    from PIL import Image
    Image.fromarray(data.to_uint8(photo)).save(tmp_path / "photo.png")
    assert sample.main(["--ref", str(tmp_path / "photo.png"), "--ref-crop", "--steps", "1",
                        "--out", str(tmp_path / "v.gif")]) == 0
    err = capsys.readouterr().err
    assert "this model knows only the synthetic world's faces" in err
    assert "the synthetic world's face detector crops the reference" in err
    blank = tmp_path / "blank.png"
    Image.fromarray(data.to_uint8(torch.ones(3, 64, 64))).save(blank)
    assert sample.main(["--ref", str(blank), "--ref-crop", "--steps", "1", "--out", str(tmp_path / "w.gif")]) == 2
    assert f"no face found in {blank}" in capsys.readouterr().err


# ----------------------------------------------------------------------------- sampling as LTX2Pipeline does

def test_sampler_matches_ltx2_pipeline_without_the_reference():
    """Issue 16.6: with the reference off, pipeline.denoise (CFG s_y, STG, guidance rescale, LTX-2.3's shipped
    scheduler: dynamic shift, shift_terminal 0.1) gives the latents of LTX2Pipeline.__call__ at the same settings,
    from the same noise, on tiny random weights (the audio-to-video attention zeroed: model.py has no audio)."""
    import numpy as np

    from guidance import shift_for_tokens, timesteps
    from ltx2.convert import LTX2_SCHEDULER
    from pipeline import denoise

    transformer = diffusers_ltx2("split", False, perturbed_attn=True)  # STG's attention processor
    with torch.no_grad():
        for block in transformer.transformer_blocks:
            torch.nn.init.zeros_(block.audio_to_video_attn.to_out[0].weight)
            torch.nn.init.zeros_(block.audio_to_video_attn.to_out[0].bias)
    vae = diffusers.AutoencoderKLLTX2Video(**{**TINY_VAE, "patch_size": 4, "spatial_compression_ratio": 32,
                                              "temporal_compression_ratio": 8, "scaling_factor": 1.0})
    audio_vae = diffusers.AutoencoderKLLTX2Audio(base_channels=4, ch_mult=(1,), num_res_blocks=1, latent_channels=1,
                                                 mel_bins=16)
    pipe = diffusers.LTX2Pipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**LTX2_SCHEDULER), vae=vae,
                                  audio_vae=audio_vae, text_encoder=None, tokenizer=None, connectors=tiny_connectors(),
                                  transformer=transformer, vocoder=None)
    g = torch.Generator().manual_seed(5)
    emb, neg = torch.randn(1, 8, 48, generator=g), torch.randn(1, 8, 48, generator=g)
    mask, neg_mask = torch.ones(1, 8, dtype=torch.long), torch.ones(1, 8, dtype=torch.long)
    mask[0, :3] = 0  # left padding, as Gemma's tokenizer pads
    z = torch.randn(1, 8, 2, 2, 3, generator=g)  # 9 frames of 64 x 96 pixels
    steps, s_y, s_stg, rescale = 4, 3.0, 1.0, 0.7
    expected = pipe(prompt_embeds=emb, prompt_attention_mask=mask, negative_prompt_embeds=neg,
                    negative_prompt_attention_mask=neg_mask, height=64, width=96, num_frames=9, frame_rate=24.0,
                    num_inference_steps=steps, guidance_scale=s_y, stg_scale=s_stg, modality_scale=1.0,
                    guidance_rescale=rescale, spatio_temporal_guidance_blocks=[1], latents=z.flatten(2).transpose(1, 2),
                    output_type="latent", return_dict=False)[0]
    np.testing.assert_allclose(pipe.scheduler.sigmas.numpy(),
                               timesteps(steps, shift_for_tokens(12), LTX2_SCHEDULER["shift_terminal"]).numpy(), rtol=1e-6)
    with torch.no_grad():
        video, _, video_mask = pipe.connectors(torch.cat([neg, emb]), torch.cat([neg_mask, mask]), padding_side="left")
    cfg, _ = dit_config_from_diffusers(transformer.config)
    dit = load_dit(transformer.state_dict(), cfg).eval()
    text = (video[1:], video_mask[1:].bool(), video[:1], video_mask[:1].bool())
    got = denoise(dit, z, text, None, s_y=s_y, steps=steps, s_stg=s_stg, stg_blocks=(1,), rescale=rescale,
                  terminal=LTX2_SCHEDULER["shift_terminal"], progress=False)
    err = (got - expected).abs().max() / expected.abs().max()
    assert err <= 1e-4, f"relative error {err:.2e}"
    plain = denoise(dit, z, text, None, s_y=s_y, steps=steps, terminal=0.1, progress=False)  # STG and rescale matter
    assert (plain - expected).abs().max() / expected.abs().max() > 1e-2


# ----------------------------------------------------------------------------- non-square video

def test_non_square_frames_through_data_training_and_the_memory_plan(ltx2_world, tmp_path):
    """Issue 16.7: (height, width) through ManifestDataset (landmarks mapped by hand: a 16 x 16 clip covers 16 x 24
    at scale 1.5, rows 4..19 kept), one training step, and the memory plan's token count."""
    import data
    import train
    from ltx2.memory import memory_plan

    root, _, manifest = ltx2_world
    item = data.ManifestDataset(manifest, 9, (16, 24), fps=8, train=False)[0]
    assert item["video"].shape == (3, 9, 16, 24) and item["ref"].shape == (3, 16, 24)
    torch.testing.assert_close(data.crop_landmarks(torch.tensor([[10.0, 8.0]]), 16, 16, (16, 24)),
                               torch.tensor([[15.0, 8.0]]))
    run = train.train(train.parse_args(["--stage", "dit", "--config", "ltx2", "--init", str(root / "pipe"),
                                        "--data", str(manifest), "--height", "16", "--width", "24", "--frames", "9",
                                        "--fps", "8", "--batch", "2", "--workers", "0", "--steps", "1", "--no-progress",
                                        "--out", str(tmp_path / "wide")]))
    assert json.loads((run / "metrics.jsonl").read_text())["step"] == 1
    with pytest.raises(EXPECTED, match="the synthetic world renders square frames; 32x48"):
        train.train(train.parse_args(["--stage", "vae", "--height", "32", "--width", "48", "--out", str(tmp_path / "synth")]))
    plan = memory_plan(8, frames=121, height=512, width=768, batch=32)
    assert plan["tokens"] == (1 + 120 // 8) * 16 * 24 + 16 * 24  # video latents + one reference frame


# ----------------------------------------------------------------------------- LoRA

def test_lora_matches_peft():
    """Issue 16.9: infra.lora on a DiT computes what peft's LoRA computes with the same A and B, and merges to the
    same weights as peft's merge."""
    peft = pytest.importorskip("peft", reason="peft is the LoRA reference")
    import copy

    from infra.lora import LORA_TARGETS, add_lora, merged_state_dict
    from model import DiT, DiTConfig

    torch.manual_seed(0)
    dit = DiT(DiTConfig(in_channels=4, dim=32, depth=2, heads=2, text_dim=16)).eval()
    with torch.no_grad():  # a DiT that is not at its zero-initialised start
        for p in dit.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ref = peft.inject_adapter_in_model(peft.LoraConfig(r=3, lora_alpha=6, target_modules=LORA_TARGETS.pattern[1:-1]),
                                       copy.deepcopy(dit))
    assert add_lora(dit, rank=3, alpha=6) == 2 * 10
    g = torch.Generator().manual_seed(1)
    ours = dict(dit.named_parameters())
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g))
                ours[name.replace(".default", "")].copy_(p)
    assert {n for n, p in dit.named_parameters() if p.requires_grad} == \
        {n.replace(".default", "") for n, p in ref.named_parameters() if ".lora_" in n}
    z_t, y = torch.randn(2, 4, 2, 2, 2, generator=g), torch.randn(2, 3, 16, generator=g)
    args = (z_t, torch.tensor([0.2, 0.7]), y, torch.ones(2, 3, dtype=torch.bool), torch.randn(2, 4, 2, 2, generator=g))
    with torch.no_grad():
        torch.testing.assert_close(dit(*args), ref(*args), rtol=1e-5, atol=1e-6)
    merged = merged_state_dict(dit.state_dict(), 6 / 3)
    for module in ref.modules():
        if hasattr(module, "merge") and hasattr(module, "lora_A"):
            module.merge()
    expected = {k.replace(".base_layer", ""): v for k, v in ref.state_dict().items() if ".lora_" not in k}
    assert merged.keys() == expected.keys()
    for k, v in expected.items():
        torch.testing.assert_close(merged[k], v, rtol=1e-5, atol=1e-6)


def test_lora_training_saves_the_adapter_and_merges_it(tmp_path):
    """train.py --lora-rank: only the adapters move; the checkpoint holds W + (alpha / r) B A and the adapter alone;
    --resume continues; sample.py reads the merged checkpoint."""
    import sample
    import train
    from safetensors.torch import load_file

    from infra import checkpoint
    from infra.lora import merged_state_dict

    base = ["--config", "tiny", "--stage", "dit", "--batch", "2", "--no-progress", "--lr", "1e-2", "--warmup", "1",
            "--ema", "0"]
    vae = train.train(train.parse_args(["--config", "tiny", "--stage", "vae", "--batch", "2", "--steps", "1",
                                        "--no-progress", "--out", str(tmp_path / "vae")]))
    init = train.train(train.parse_args(base + ["--init", str(vae), "--steps", "2", "--out", str(tmp_path / "init")]))  # gates open
    common = base + ["--init", str(init), "--lora-rank", "4", "--lora-alpha", "8", "--out", str(tmp_path / "run")]
    run = train.train(train.parse_args(common + ["--steps", "2"]))
    folder = checkpoint.resolve(run)
    weights, adapter = load_file(str(folder / "model.safetensors")), load_file(str(folder / "adapter.safetensors"))
    raw = checkpoint.read_state(folder / "state.pt")["raw"]
    assert adapter.keys() == {k for k in raw if ".lora_" in k} and len(adapter) == 2 * 2 * 10
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if ".lora_B." in k)  # trained
    merged = merged_state_dict(raw, 8 / 4)  # --ema 0: the raw weights are the inference weights
    for k, v in merged.items():
        assert torch.equal(weights[k], v), k
    start = load_file(str(checkpoint.resolve(init) / "model.safetensors"))
    assert all(torch.equal(raw[k], start[k]) for k in raw if ".lora_" not in k)  # everything else frozen
    train.train(train.parse_args(common + ["--steps", "3", "--resume"]))
    assert checkpoint.resolve(run).name == "step_000003"
    assert sample.main(["--ckpt", str(run), "--steps", "1", "--out", str(tmp_path / "v.gif")]) == 0


def test_memory_plan_has_a_lora_line(capsys):
    """The LoRA line counts r (in + out) for each attention projection (4096 -> 4096, 4 per attention, 2 attentions)
    and the FFN (4096 <-> 16384) of the 48 blocks, and holds the frozen DiT in fp32."""
    from ltx2.__main__ import main
    from ltx2.memory import memory_plan

    plan = memory_plan(8, 121, 512, 768, 32, lora_rank=64)
    assert plan["lora_params"] == 48 * 64 * (8 * (4096 + 4096) + 2 * (4096 + 16384))
    full = memory_plan(8, 121, 512, 768, 32)
    assert plan["activations"] == full["activations"] and plan["adamw"] == 8 * plan["lora_params"] / 2**30
    assert main(["memory-plan", "--lora-rank", "64"]) == 0
    assert "ltx2-video LoRA rank 64 (327 M trained parameters" in capsys.readouterr().out


def test_gpu_checks_script_parses_and_names_what_exists():
    """scripts/gpu_checks.sh (run on a GPU machine, not here): valid bash, and every module and file it runs exists."""
    import re

    script = (ROOT / "scripts" / "gpu_checks.sh").read_text()
    assert subprocess.run(["bash", "-n", str(ROOT / "scripts" / "gpu_checks.sh")]).returncode == 0
    for module in re.findall(r"-m ([\w.]+)", script):
        if module not in ("pytest",):
            assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), module
    for path in re.findall(r"(tests/\w+\.py|train\.py)", script):
        assert (ROOT / path).is_file(), path


def test_lora_adapter_loads_in_diffusers():
    """Issue 16.9: an adapter of model.py's DiT, written in diffusers' LoRA layout for an interleaved checkpoint, gives
    in diffusers (load_lora_adapter, peft) the video velocity of model.py's DiT with the adapter."""
    pytest.importorskip("peft", reason="diffusers loads LoRA adapters through peft")
    from infra.lora import add_lora, adapter_state_dict
    from ltx2.export import adapter_to_diffusers

    base = diffusers_ltx2("interleaved", True)
    cfg, layout = dit_config_from_diffusers(base.config)
    model = load_dit(base.state_dict(), cfg, layout).eval()
    add_lora(model, rank=2, alpha=6)
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    lora = adapter_to_diffusers(adapter_state_dict(model.state_dict()), base.state_dict().keys(), cfg.heads, layout, 3.0)
    assert "transformer.transformer_blocks.1.ff.net.0.proj.lora_A.weight" in lora
    base.load_lora_adapter(lora, prefix="transformer", adapter_name="stdrc")
    assert_same_video_velocity(base, model, captions=True)


def test_lora_run_exports_merged_weights_and_the_adapter(ltx2_world, tmp_path):
    """train.py --config ltx2 --lora-rank, then python -m ltx2 export: the merged transformer, and the adapter in
    diffusers' layout that on the base transformer computes what the merged one does."""
    pytest.importorskip("peft", reason="diffusers loads LoRA adapters through peft")
    import train
    from ltx2.__main__ import main

    root, _, manifest = ltx2_world
    run = train.train(train.parse_args(["--stage", "dit", "--config", "ltx2", "--init", str(root / "pipe"), "--data",
                                        str(manifest), "--size", "16", "--frames", "9", "--fps", "8", "--batch", "2",
                                        "--workers", "0", "--steps", "2", "--lr", "1e-2", "--warmup", "1", "--lora-rank",
                                        "2", "--lora-alpha", "4", "--no-progress", "--out", str(tmp_path / "run")]))
    assert main(["export", "--ckpt", str(run), "--base", str(root / "pipe"), "--out", str(tmp_path / "exp")]) == 0
    base = diffusers.LTX2VideoTransformer3DModel.from_pretrained(root / "pipe" / "transformer").eval()
    cfg, _ = dit_config_from_diffusers(base.config)
    merged = load_ltx2(str(tmp_path / "exp" / "diffusion_pytorch_model.safetensors"), cfg).eval()
    assert not torch.equal(merged.blocks[0].attn1.to_q.weight, load_dit(base.state_dict(), cfg).blocks[0].attn1.to_q.weight)
    base.load_lora_adapter(str(tmp_path / "exp" / "pytorch_lora_weights.safetensors"), prefix="transformer")
    assert_same_video_velocity(base, merged, captions=False)


def test_decoupled_cfg_with_stg_and_rescale_on_top():
    """With the reference on: one batched forward of [v_0 | v_y | v_yr | v_stg] equals the four streams run one at a
    time, combined by hand: v_0 + s_y (v_y - v_0) + s_r (v_yr - v_y) + s_stg (v_yr - v_stg), then the rescale of
    x0 = z - t v towards x0_yr's standard deviation."""
    from guidance import three_stream_velocity

    ref = diffusers_ltx2("split", False)
    cfg, _ = dit_config_from_diffusers(ref.config)
    dit = load_dit(ref.state_dict(), cfg).eval()
    g = torch.Generator().manual_seed(9)
    z, z_ref = torch.randn(1, 8, T, H, W, generator=g), torch.randn(1, 8, H, W, generator=g)
    y, y_0 = torch.randn(1, L, 32, generator=g), torch.randn(1, L, 32, generator=g)
    mask = torch.ones(1, L, dtype=torch.bool)
    t = torch.tensor([0.6])
    with torch.no_grad():
        v_0, v_y = dit(z, t, y_0, mask), dit(z, t, y, mask)
        v_yr = dit(z, t, y, mask, z_ref=z_ref)
        v_stg = dit(z, t, y, mask, z_ref=z_ref, stg_blocks=(1,), stg=torch.tensor([True]))
        got = three_stream_velocity(dit, z, t, y, mask, y_0, mask, z_ref, 5.0, 7.5, s_stg=1.0, stg_blocks=(1,),
                                    rescale=0.7)
    v = v_0 + 5.0 * (v_y - v_0) + 7.5 * (v_yr - v_y) + 1.0 * (v_yr - v_stg)
    x0, x0_c = z - 0.6 * v, z - 0.6 * v_yr
    x0 = 0.7 * x0 * x0_c.std() / x0.std() + 0.3 * x0
    torch.testing.assert_close(got, (z - x0) / 0.6, rtol=1e-4, atol=1e-5)
    assert (v_stg - v_yr).abs().max() > 1e-3  # the skipped attention changes the stream

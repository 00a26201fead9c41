"""LTX-2.3's video branch in model.py: checkpoint conversion and export, the LTX-2 VAE, prompt embeddings, a memory
plan. The user's walk from downloaded weights to a fine-tuned sample: docs/ltx2.md.

`load_ltx2(path)` reads an LTX-2.3 transformer checkpoint (safetensors, diffusers' key layout or the
official single-file one; one file or diffusers' shards) into `DiT(CONFIGS["ltx2-video"])`. The model
is built on the meta device and each parameter is assigned its tensor memory-mapped from the file
(read where used), so a 48-layer checkpoint never needs two copies in memory; the audio branch is
never read. `build_pipeline` puts it in the project's Pipeline (train.py --config ltx2 --init,
sample.py --ckpt): the DiT from a diffusers folder (config.json + diffusion_pytorch_model*.safetensors,
or a whole pipeline folder: its transformer/ and vae/) or one .safetensors file (then the full
ltx2-video shape and the "split" RoPE layout); `LTX2VAE` wraps diffusers' AutoencoderKLLTX2Video
behind VideoVAE's interface; no text encoder: the DiT reads precomputed prompt embeddings.

Prompt embeddings (`python -m ltx2 encode-prompts --manifest m.jsonl --gemma PATH`): each distinct
caption goes through LTX-2.3's prompt encoding as diffusers' LTX2Pipeline runs it (Gemma 3 hidden
states of every layer -> the video text connector), written as text.load_prompt_embeds reads it,
plus the empty prompt's (text.EMPTY_EMBEDS), and a copy of the manifest with "prompt_embeds" fields.
PATH is a local diffusers LTX-2.3 pipeline folder (model_index.json, text_encoder/, tokenizer/,
connectors/); the `transformers` package runs Gemma.

Key map: the table in docs/ltx2.md; in code, OFFICIAL_RENAMES, TOP_LEVEL and IN_BLOCK_RENAMES (convert.py).
Export (`python -m ltx2 export`, export.py): a DiT trained here back into diffusers' LTX2VideoTransformer3DModel
layout on top of its base checkpoint (the inverse of the key map; the audio branch copied from the base).

RoPE layout: model.py rotates each head's channels in the rotate-half ("split") layout. A checkpoint
trained with the "interleaved" layout (pairs (2m, 2m+1)) is converted by permuting each head's
channels of attn1's `to_q`, `to_k`, `norm_q`, `norm_k` to (even..., odd...): q and k move together,
so every q.k — hence the attention — is unchanged (the qk-RMSNorm spans all heads and is
permutation invariant).

Memory plan (`python -m ltx2 memory-plan`): full fine-tuning of ltx2-video as train.py runs it with
--fsdp (FSDP2, fp32 master weights sharded over the GPUs, bf16 compute, fp32 gradient reduction,
gradient checkpointing per block). Per GPU, for N GPUs and a micro-batch of b = ceil(batch / N):
parameters 4P/N + the bf16 copy of two gathered blocks (current + prefetched), gradients 4P/N,
AdamW moments 8P/N, the EMA 4P/N (sharded like the weights; --ema 0: none); activations b x (depth
block inputs of n x dim in bf16 + one block's recompute, ~34 n dim bytes: Korthikanti et al.'s
per-layer count without attention scores, which flash attention never stores), n = video tokens +
reference tokens. Buffers, the VAE (frozen, encodes up front) and
allocator fragmentation are not counted: keep ~10 % headroom. --lora-rank r adds the plan of train.py --lora-rank
(data-parallel: the frozen DiT in fp32 on every GPU, the adapters' weights, gradients, AdamW moments and EMA).

    python -m ltx2 memory-plan [--frames 121 --height 512 --width 768 --batch 32 --lora-rank 64]
"""

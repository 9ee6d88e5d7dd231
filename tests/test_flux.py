"""FLUX.1 pieces on the tiny kits (dev: guidance embedding + dynamic shift; schnell: neither):
the kits load in the stock FluxPipeline, caption encoding equals its encode_prompt, packing and
position ids follow the formulas, the shifted σ grid equals the stock scheduler's, a per-row
rollout equals the stock FluxPipeline's trajectory row by row, the training pieces follow their
formulas, and a LoRA over a torchao int8 base trains only its adapters.
"""
import math

import numpy as np
import pytest
import torch

from rpo.tiny.__main__ import KITS

VARIANTS = ("flux", "flux-schnell")


@pytest.fixture(scope="module")
def fluxkit(tmp_path_factory):
    root = tmp_path_factory.mktemp("fluxkit")
    paths = {}
    for kind in VARIANTS:
        paths[kind] = str(root / kind)
        KITS[kind](paths[kind], seed=0)
    return paths


def stock_pipeline(path):
    from diffusers import FluxPipeline
    pipe = FluxPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("kind", VARIANTS)
def test_tiny_kit_is_a_stock_flux_pipeline(fluxkit, kind):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel
    pipe = stock_pipeline(fluxkit[kind])
    dev = kind == "flux"
    assert isinstance(pipe.transformer, FluxTransformer2DModel)
    assert isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.text_encoder_2, T5EncoderModel)
    assert pipe.transformer.config.guidance_embeds is dev
    s = pipe.scheduler.config
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    # FLUX.1-dev / FLUX.1-schnell scheduler_config.json
    assert (s.use_dynamic_shifting, s.shift) == ((True, 3.0) if dev else (False, 1.0))
    assert (s.base_shift, s.max_shift, s.base_image_seq_len, s.max_image_seq_len) == (0.5, 1.15, 256, 4096)
    assert pipe.vae.config.latent_channels == 16 and pipe.transformer.config.in_channels == 4 * 16
    assert (pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor) == (0.3611, 0.1159)  # FLUX's VAE
    t5 = pipe.tokenizer_2
    ids = t5("a red fox sitting in fresh snow").input_ids
    assert t5.unk_token_id not in ids and ids[-1] == t5.eos_token_id and len(ids) == 8  # 7 words + </s>
    assert t5.model_max_length == 512
    image = pipe("a red fox", height=32, width=32, num_inference_steps=2,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)


def test_text_encoders_equal_stock_encode_prompt_and_cache(fluxkit):
    from diffusers import FluxPipeline
    from rpo.models_flux import load_flux_text_encoders, text_ids
    captions = ["a red fox sitting in fresh snow", "a cute robot watering plants in a greenhouse", ""]
    text = load_flux_text_encoders(fluxkit["flux"])
    embeds, pooled = text.encode(captions)
    stock = FluxPipeline.from_pretrained(fluxkit["flux"], transformer=None, vae=None)
    with torch.no_grad():
        want_e, want_p, want_ids = stock.encode_prompt(captions, None, max_sequence_length=512)
        # independently: CLIP's pooled output, T5's last hidden states over 512 padded tokens
        clip_ids = stock.tokenizer(captions, padding="max_length", max_length=77, truncation=True,
                                   return_tensors="pt").input_ids
        t5_ids = stock.tokenizer_2(captions, padding="max_length", max_length=512, truncation=True,
                                   return_tensors="pt").input_ids
        direct_p = stock.text_encoder(clip_ids).pooler_output
        direct_e = stock.text_encoder_2(t5_ids)[0]
    assert embeds.shape == (3, 512, 32) and pooled.shape == (3, 32)
    assert torch.allclose(embeds, want_e, atol=1e-5) and torch.allclose(pooled, want_p, atol=1e-6)
    assert torch.allclose(direct_e, want_e, atol=1e-5) and torch.allclose(direct_p, want_p, atol=1e-6)
    assert torch.equal(text_ids(512), want_ids)
    text.release_encoders()
    again, _ = text.encode(captions[::-1])  # from the cache
    assert torch.equal(again, embeds.flip(0))
    with pytest.raises(RuntimeError, match="not precomputed"):
        text.encode(["a caption never seen"])


def test_packing_position_ids_and_vae_normalisation_by_formula():
    from rpo.models_flux import (denormalise_latents, image_ids, image_seq_len, latent_size, normalise_latents,
                                 pack_latents, unpack_latents)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 4, 6, generator=g)
    packed = pack_latents(x)
    assert packed.shape == (2, 2 * 3, 64) and image_seq_len(4, 6) == 6
    for i in range(2):
        for j in range(3):  # token (i, j) holds the 2x2 patch, channel-major: (c, dy, dx)
            assert torch.equal(packed[:, i * 3 + j], x[:, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2].reshape(2, 64))
    assert torch.equal(unpack_latents(packed, 4, 6), x)
    ids = image_ids(4, 6)
    assert ids.tolist() == [[0, i, j] for i in range(2) for j in range(3)]
    with pytest.raises(ValueError, match="even"):
        pack_latents(torch.zeros(1, 16, 3, 4))
    # packing is a permutation: noising, an Euler step and the per-sample MSE are the same packed or not
    eps, v = torch.randn(x.shape, generator=g), torch.randn(x.shape, generator=g)
    s, ds = 0.7, -0.2
    assert torch.equal(pack_latents((1 - s) * x + s * eps), (1 - s) * packed + s * pack_latents(eps))
    assert torch.equal(pack_latents(x + ds * v), packed + ds * pack_latents(v))
    assert torch.allclose(((x - v) ** 2).mean(dim=(1, 2, 3)), ((packed - pack_latents(v)) ** 2).mean(dim=(1, 2)))
    vae = {"scaling_factor": 0.3611, "shift_factor": 0.1159, "block_out_channels": [128, 256, 512, 512]}
    assert torch.allclose(normalise_latents(x, vae), (x - 0.1159) * 0.3611)
    assert torch.allclose(denormalise_latents(normalise_latents(x, vae), vae), x, atol=1e-6)
    assert latent_size(1024, vae) == 128 and latent_size(520, vae) == 64  # FluxPipeline rounds to 16 px


def dev_config():
    from rpo.tiny.flux import FLUX_DEV_SCHEDULER
    from rpo.diffusion.flux_flow import check_flux_schedule
    return check_flux_schedule(FLUX_DEV_SCHEDULER)


def schnell_config():
    from rpo.tiny.flux import FLUX_SCHNELL_SCHEDULER
    from rpo.diffusion.flux_flow import check_flux_schedule
    return check_flux_schedule(FLUX_SCHNELL_SCHEDULER)


@pytest.mark.parametrize("seq_len", [4, 256, 1024, 4096])
def test_dynamic_shift_mu_and_unperturbed_grid_equal_the_stock_scheduler(seq_len):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from rpo.diffusion.flux_flow import flux_timesteps
    from rpo.models_flux import dynamic_shift_mu
    config = dev_config()
    m = (1.15 - 0.5) / (4096 - 256)  # mu linear in the token count: 0.5 at 256 tokens, 1.15 at 4096
    mu = seq_len * m + 0.5 - m * 256
    assert dynamic_shift_mu(config, seq_len) == pytest.approx(mu, abs=1e-12)
    for steps in (4, 20, 28):
        stock = FlowMatchEulerDiscreteScheduler.from_config(config)
        stock.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)  # what FluxPipeline does
        got = flux_timesteps(config, steps, 2, False, seq_len)
        assert got.dtype == torch.long and torch.equal(got[0], got[1])
        assert (got[0].double() - stock.timesteps.double()).abs().max() <= 0.5 + 1e-3  # rounded to integers
        assert torch.equal(got[0], stock.timesteps.double().round().long())


def test_perturbed_grid_by_formula_and_schnell_grid():
    from diffusers import FlowMatchEulerDiscreteScheduler
    from rpo.diffusion.flux_flow import flux_timesteps
    config, T, seq_len = dev_config(), 6, 64
    got = flux_timesteps(config, T, 3, True, seq_len, generator=torch.Generator().manual_seed(5))
    u = torch.rand((3, 1), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    base = 1 - (torch.arange(T, dtype=torch.float64) + u) / T
    m = 0.65 / 3840
    a = math.exp(seq_len * m + 0.5 - 256 * m)
    want = (1000 * a / (a + 1 / base - 1)).round().clamp(1, 1000).long()  # FLUX's exponential time shift
    assert torch.equal(got, want) and len({tuple(r) for r in got.tolist()}) == 3
    for i in range(3):  # the stock scheduler shifts each row's base the same way
        stock = FlowMatchEulerDiscreteScheduler.from_config(config)
        stock.set_timesteps(sigmas=base[i].numpy(), mu=seq_len * m + 0.5 - 256 * m)
        assert torch.equal(got[i], stock.timesteps.double().round().long())
    # schnell: static shift 1, its 4-step grid is exactly FluxPipeline's at any size
    assert flux_timesteps(schnell_config(), 4, 1, False, 4096).tolist() == [[1000, 750, 500, 250]]


def unpack_record(h, w):
    from rpo.models_flux import unpack_latents
    seen = []

    def callback(pipe, i, t, kwargs):
        seen.append(unpack_latents(kwargs["latents"].clone(), h, w))
        return {}
    return seen, callback


@pytest.mark.parametrize("kind", VARIANTS)
def test_rollout_equals_stock_flux_pipeline_row_by_row(fluxkit, kind):
    """Perturbed per-row grids; each row alone through the stock FluxPipeline (its `sigmas=`
    set to the row's unshifted rounded grid, its μ its own) gives the same latents after every
    step as the batched per-row rollout."""
    from rpo.diffusion.flux_flow import (FluxAsDenoiser, flux_timesteps, pipeline_sigmas, read_flux_schedule,
                                         rollout_conditioning, sampler)
    from rpo.diffusion.rollout import rollout
    from rpo.models_flux import image_seq_len, load_flux_text_encoders, pack_latents
    pipe = stock_pipeline(fluxkit[kind])
    config = read_flux_schedule(fluxkit[kind])
    B, T, h, w, g = 3, 4, 4, 4, 3.5  # 32 px images: 4x4 latents, 4 packed tokens
    grid = flux_timesteps(config, T, B, True, image_seq_len(h, w), generator=torch.Generator().manual_seed(1))
    embeds, pooled = load_flux_text_encoders(fluxkit[kind]).encode(
        ["a red fox sitting in fresh snow", "a lighthouse on a cliff during a storm, oil painting", ""])
    x_T = torch.randn(B, 16, h, w, generator=torch.Generator().manual_seed(2))
    model = FluxAsDenoiser(pipe.transformer)
    cond = rollout_conditioning(pipe.transformer, pooled, g)
    assert ("guidance" in cond) is (kind == "flux")
    traj = rollout(model, sampler(config), x_T, grid, embeds, added_cond_kwargs=cond)
    for i in range(B):
        seen, callback = unpack_record(h, w)
        out = pipe(prompt_embeds=embeds[i:i + 1], pooled_prompt_embeds=pooled[i:i + 1], latents=pack_latents(x_T[i:i + 1]),
                   height=32, width=32, num_inference_steps=T, guidance_scale=g,
                   sigmas=pipeline_sigmas(config, grid[i], image_seq_len(h, w)), output_type="latent",
                   callback_on_step_end=callback).images
        assert torch.allclose(pipe.scheduler.timesteps.double(), grid[i].double(), atol=1e-3)
        for k in range(1, T):  # the model input at step k is the stock latent after step k - 1
            assert torch.allclose(traj.x_t[i, k], seen[k - 1][0], atol=1e-5, rtol=0), (i, k)
        assert torch.allclose(traj.x_final[i], seen[-1][0], atol=1e-5, rtol=0)
        assert torch.allclose(pack_latents(traj.x_final[i:i + 1]), out, atol=1e-5, rtol=0)
    # the velocities really come from the model and its conditioning: other rows, other ends
    assert not torch.allclose(traj.x_final[0], traj.x_final[1], atol=1e-3)
    if kind == "flux":  # the guidance embedding is an input: another scale, another trajectory
        other = rollout(model, sampler(config), x_T, grid, embeds,
                        added_cond_kwargs=rollout_conditioning(pipe.transformer, pooled, 1.0))
        assert (other.x_final - traj.x_final).abs().max() > 1e-4


def test_schnell_default_pipeline_call_is_the_integer_grid(fluxkit):
    """schnell's grid is integer already: the plain stock call (no `sigmas=`) is the rollout."""
    from rpo.diffusion.flux_flow import FluxAsDenoiser, flux_timesteps, read_flux_schedule, rollout_conditioning, sampler
    from rpo.diffusion.rollout import rollout
    from rpo.models_flux import load_flux_text_encoders, pack_latents
    pipe = stock_pipeline(fluxkit["flux-schnell"])
    config = read_flux_schedule(fluxkit["flux-schnell"])
    embeds, pooled = load_flux_text_encoders(fluxkit["flux-schnell"]).encode(["a red fox sitting in fresh snow"])
    x_T = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(3))
    grid = flux_timesteps(config, 4, 1, False, 4)
    traj = rollout(FluxAsDenoiser(pipe.transformer), sampler(config), x_T, grid, embeds,
                   added_cond_kwargs=rollout_conditioning(pipe.transformer, pooled, 0.0))
    out = pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, latents=pack_latents(x_T), height=32, width=32,
               num_inference_steps=4, output_type="latent").images
    assert torch.allclose(pack_latents(traj.x_final), out, atol=1e-5, rtol=0)


def test_guidance_must_match_the_transformer(fluxkit):
    from rpo.diffusion.flux_flow import flux_velocity
    from rpo.models_flux import load_flux_transformer
    x, t = torch.randn(1, 16, 4, 4), torch.tensor([500])
    e, p = torch.randn(1, 7, 32), torch.randn(1, 32)
    with pytest.raises(ValueError, match="guidance embedding"):
        flux_velocity(load_flux_transformer(fluxkit["flux"]), x, t, e, p)
    with pytest.raises(ValueError, match="no guidance embedding"):
        flux_velocity(load_flux_transformer(fluxkit["flux-schnell"]), x, t, e, p, guidance=torch.tensor([3.5]))


def test_truncated_rollout_slices_guidance_per_row(fluxkit):
    from rpo.diffusion.flux_flow import FluxAsDenoiser, flux_timesteps, read_flux_schedule, sampler
    from rpo.diffusion.rollout import rollout, truncated_rollout
    from rpo.models_flux import load_flux_transformer
    config = read_flux_schedule(fluxkit["flux"])
    model = FluxAsDenoiser(load_flux_transformer(fluxkit["flux"]))
    g = torch.Generator().manual_seed(0)
    grid = flux_timesteps(config, 4, 3, True, 4, generator=g)
    x_T = torch.randn(3, 16, 4, 4, generator=g)
    embeds, pooled = torch.randn(3, 7, 32, generator=g), torch.randn(3, 32, generator=g)
    cond = {"pooled_projections": pooled, "guidance": torch.tensor([1.0, 3.5, 6.0])}  # a guidance per row
    whole = rollout(model, sampler(config), x_T, grid, embeds, added_cond_kwargs=cond)
    stop = torch.tensor([2, -1, 0])
    picks = truncated_rollout(model, sampler(config), x_T, grid, embeds, stop, added_cond_kwargs=cond)
    for i, k in ((0, 2), (2, 0)):
        assert picks.t[i] == grid[i, k]
        assert torch.allclose(picks.x_t[i], whole.x_t[i, k], atol=1e-6)
        assert torch.allclose(picks.eps[i], whole.eps[i, k], atol=1e-5)
    assert picks.unet_rows == 3 + 1


def test_training_pieces_by_formula():
    from rpo.diffusion.flux_flow import add_noise, training_timesteps, velocity_target
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 16, 4, 4, generator=g), torch.randn(2, 16, 4, 4, generator=g)
    t = torch.tensor([250, 900])
    got = add_noise(x0, eps, t, 1000)
    assert torch.allclose(got[0], 0.75 * x0[0] + 0.25 * eps[0]) and torch.allclose(got[1], 0.1 * x0[1] + 0.9 * eps[1])
    assert torch.equal(velocity_target(x0, eps), eps - x0)
    # resample: sigma = sigmoid(u), u ~ N(0, 1) (float64 from the generator), then FLUX's shift at this size
    config, seq_len = dev_config(), 1024
    got = training_timesteps(config, 5000, seq_len, generator=torch.Generator().manual_seed(1))
    u = torch.randn((5000,), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    m = 0.65 / 3840
    a = math.exp(seq_len * m + 0.5 - 256 * m)
    sigma = torch.sigmoid(u)
    want = 1000 * a / (a + 1 / sigma - 1)
    assert got.dtype == torch.float32 and torch.allclose(got.double(), want.float().double(), atol=0, rtol=0)
    assert (got > 500).double().mean() > 0.6  # the shift (a ~ 1.9 at 1024 tokens) moves the median up


def test_refuses_grids_the_per_row_sampler_cannot_follow():
    from rpo.cli import UserError
    from rpo.diffusion.flux_flow import check_flux_schedule
    from rpo.tiny.flux import FLUX_DEV_SCHEDULER
    for key, value in (("use_karras_sigmas", True), ("shift_terminal", 0.1), ("stochastic_sampling", True)):
        with pytest.raises(UserError, match=key):
            check_flux_schedule(dict(FLUX_DEV_SCHEDULER, **{key: value}))


def test_lora_over_torchao_int8_base_trains_only_adapters(fluxkit):
    """A quantized frozen base (diffusers' TorchAoConfig, int8 weight-only) with a peft LoRA:
    only adapter parameters get gradients and move; the base weights stay the quantized ones;
    with adapters disabled the model gives the quantized base's output bit for bit."""
    pytest.importorskip("torchao")
    from diffusers import FluxTransformer2DModel, TorchAoConfig
    from peft import LoraConfig
    from torchao.quantization import Int8WeightOnlyConfig
    from rpo.diffusion.flux_flow import flux_velocity
    from rpo.families.sd15 import UNET_LORA_TARGETS as LORA_TARGET_MODULES
    q = TorchAoConfig(Int8WeightOnlyConfig())
    model = FluxTransformer2DModel.from_pretrained(fluxkit["flux"], subfolder="transformer", quantization_config=q,
                                                   torch_dtype=torch.bfloat16)
    plain = FluxTransformer2DModel.from_pretrained(fluxkit["flux"], subfolder="transformer", torch_dtype=torch.bfloat16)
    weight = model.transformer_blocks[0].attn.to_q.weight
    assert "torchao" in type(weight).__module__  # the base really is quantized
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 16, 4, 4, generator=g).bfloat16(), torch.tensor([300, 800])
    e, p = torch.randn(2, 7, 32, generator=g).bfloat16(), torch.randn(2, 32, generator=g).bfloat16()
    guidance = torch.tensor([3.5, 3.5])

    def out(m):
        return flux_velocity(m, x, t, e, p, guidance)
    with torch.no_grad():
        base_out, plain_out = out(model), out(plain)
    assert 0 < (base_out.float() - plain_out.float()).abs().max() < 0.1  # int8 weights: close, not equal
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=list(LORA_TARGET_MODULES)), adapter_name="policy")
    adapters = [(n, q_) for n, q_ in model.named_parameters() if q_.requires_grad]
    assert adapters and all(".lora_" in n for n, _ in adapters)
    for _, a in adapters:
        a.data = a.data.float()  # adapters in fp32 over the bf16 / int8 base
    before = {n: a.detach().clone() for n, a in adapters}
    frozen = weight.dequantize().clone()
    optimizer = torch.optim.SGD([a for _, a in adapters], lr=0.5)
    target = torch.randn(x.shape, generator=g)
    losses = []
    for _ in range(3):
        loss = ((out(model).float() - target) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        assert all(a.grad is not None for _, a in adapters)
        assert all(q_.grad is None for n, q_ in model.named_parameters() if ".lora_" not in n)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert any(not torch.equal(before[n], a) for n, a in adapters)
    assert torch.equal(model.transformer_blocks[0].attn.to_q.base_layer.weight.dequantize(), frozen)
    with torch.no_grad():
        adapted = out(model)
        model.disable_adapters()
        reference = out(model)
        model.enable_adapters()
    assert torch.equal(reference, base_out)  # the reference is the quantized base, bit for bit
    assert (adapted.float() - base_out.float()).abs().max() > 1e-3


def bench_memory():
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "memory.py")
    spec = importlib.util.spec_from_file_location("bench_memory", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_flux_config_is_diffusers_defaults_but_guidance():
    """FLUX.1's architecture keys are FluxTransformer2DModel's defaults (diffusers took them from
    FLUX.1), except the guidance embedding, on in dev, off in schnell and in the default."""
    import inspect
    from diffusers import FluxTransformer2DModel
    memory = bench_memory()
    defaults = {k: p.default for k, p in inspect.signature(FluxTransformer2DModel.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    for config, guidance in ((memory.FLUX_DEV_TRANSFORMER, True), (memory.FLUX_SCHNELL_TRANSFORMER, False)):
        assert config["guidance_embeds"] is guidance
        assert {k: tuple(v) if isinstance(v, tuple) else v for k, v in config.items() if k != "guidance_embeds"} == \
            {k: defaults[k] for k in config if k != "guidance_embeds"}


def test_bench_int8_bytes_are_torchao_storage(fluxkit):
    """The 8-bit row's byte count (int8 weights + a float32 scale per output row, the rest bf16)
    is what torchao stores for the tiny kit's transformer."""
    pytest.importorskip("torchao")
    from diffusers import FluxTransformer2DModel, TorchAoConfig
    from torchao.quantization import Int8WeightOnlyConfig
    memory = bench_memory()
    plain = FluxTransformer2DModel.from_pretrained(fluxkit["flux"], subfolder="transformer", torch_dtype=torch.bfloat16)
    linears = [m for m in plain.modules() if isinstance(m, torch.nn.Linear)]
    want = memory.quantized_bytes(sum(p.numel() for p in plain.parameters()), sum(m.weight.numel() for m in linears),
                                  sum(m.weight.shape[0] for m in linears), "8-bit (torchao int8)")
    model = FluxTransformer2DModel.from_pretrained(fluxkit["flux"], subfolder="transformer", torch_dtype=torch.bfloat16,
                                                   quantization_config=TorchAoConfig(Int8WeightOnlyConfig()))
    stored = 0
    for p in model.parameters():
        names = getattr(p, "tensor_data_names", None)
        parts = [getattr(p, n) for n in names] if names else [p]
        stored += sum(t.numel() * t.element_size() for t in parts)
    assert stored == want


def test_bench_flux_activation_count_is_linear_in_samples_and_tokens():
    """The meta-device activation count: linear in the samples; 4x the image tokens
    at most ~4x the bytes (flash-style attention keeps no tokens x tokens weights); the stock
    attention function is back afterwards."""
    import torch.nn.functional as F
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig
    memory = bench_memory()
    sdpa = F.scaled_dot_product_attention
    with torch.device("meta"):
        model = FluxTransformer2DModel(num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                                       joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                                       axes_dims_rope=(4, 6, 6)).to(torch.bfloat16).requires_grad_(False)
    with pytest.raises(ValueError, match="nothing trains"):
        memory.flux_saved_bytes(model, 256, samples=1, text_len=8)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]),
                      adapter_name="policy")
    one, blocks, tokens = memory.flux_saved_bytes(model, 256, samples=1, text_len=8)
    two, _, _ = memory.flux_saved_bytes(model, 256, samples=2, text_len=8)
    three, _, _ = memory.flux_saved_bytes(model, 256, samples=3, text_len=8)
    big, _, _ = memory.flux_saved_bytes(model, 512, samples=1, text_len=8)
    assert tokens == 256 and len(blocks) == 4 and 0 < sum(blocks) <= one
    # proportional to the samples within a few % (rotary tables are shared; some views of a
    # one-sample batch share a storage that becomes a copy with more samples)
    assert 1.9 * one < two < 2.1 * one and 2.85 * one < three < 3.15 * one
    assert 3 * one < big < 4.2 * one
    assert F.scaled_dot_product_attention is sdpa


def test_lora_saved_with_flux_pipeline_loads_in_the_stock_pipeline(fluxkit, tmp_path):
    """A peft adapter on the FLUX transformer, saved as diffusers' FLUX LoRA example saves it
    (peft's state dict unconverted, `FluxPipeline.save_lora_weights` with the adapter metadata),
    loads in a stock FluxPipeline with `load_lora_weights` and gives the adapted model's output."""
    from diffusers import FluxPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from rpo.diffusion.flux_flow import flux_velocity
    from rpo.models_flux import load_flux_transformer
    from rpo.families.sd15 import UNET_LORA_TARGETS as LORA_TARGET_MODULES
    model = load_flux_transformer(fluxkit["flux"])
    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(LORA_TARGET_MODULES))
    model.add_adapter(config, adapter_name="policy")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_" in n:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(p.numel()))
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 16, 4, 4, generator=g), torch.tensor([300, 800])
    e, p_ = torch.randn(2, 7, 32, generator=g), torch.randn(2, 32, generator=g)
    guidance = torch.tensor([3.5, 3.5])
    with torch.no_grad():
        adapted = flux_velocity(model, x, t, e, p_, guidance)
    layers = get_peft_model_state_dict(model, adapter_name="policy")
    FluxPipeline.save_lora_weights(str(tmp_path), transformer_lora_layers=layers,
                                   transformer_lora_adapter_metadata=config.to_dict())
    pipe = stock_pipeline(fluxkit["flux"])
    with torch.no_grad():
        base = flux_velocity(pipe.transformer, x, t, e, p_, guidance)
    pipe.load_lora_weights(str(tmp_path))
    with torch.no_grad():
        loaded = flux_velocity(pipe.transformer, x, t, e, p_, guidance)
    assert torch.allclose(loaded, adapted, atol=1e-5, rtol=0)
    assert (base - adapted).abs().max() > 1e-2  # the adapter changes the output: the check can fail

"""What trains, what the reference is, what rolls out, and how the trained weights are saved
(docs/design.md, "Model families": full fine-tuning or LoRA).

`FullFineTune` is the paper's setting: a trainable copy of the model, a frozen reference copy
(the pretrained weights), and a frozen rollout copy only when the rollout model lags behind
the trainable one. When the rollout model is refreshed right after every optimizer update
(`--gradient_accumulation_steps` a multiple of `--buffer_update_steps`, the paper's 16/16) it
always equals the trainable weights, so rollouts use the trainable model itself and the
paper's third full UNet is not needed.

A LoRA parametrisation implements the same methods on one base model: its reference is the
base with the adapters disabled, its lagging rollout model a second frozen adapter.
"""
import contextlib
import os
import warnings

import torch
from diffusers.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import save_file

from rpo.training.checkpoint import write_model_folder
from rpo.training.ema import mix_into


class FullFineTune:
    kind = "full"
    weights_dir, ema_dir = "unet", "ema"   # ckpt-N/<folder>
    save_merged = False

    def __init__(self, *, trainable, reference, rollout=None):
        self.trainable = trainable    # the unwrapped trainable module
        self.reference_model = reference
        self.rollout_copy = rollout   # None: rollouts use the trainable model

    def named_trainable(self):
        """(name, parameter) of what the optimizer and the EMA see, in a fixed order."""
        return [(n, p) for n, p in self.trainable.named_parameters() if p.requires_grad]

    def reference(self):
        """Context manager yielding the frozen reference model."""
        return contextlib.nullcontext(self.reference_model)

    @property
    def rollout_model(self):
        return self.trainable if self.rollout_copy is None else self.rollout_copy

    def refresh_rollout(self):
        if self.rollout_copy is not None:
            self.rollout_copy.load_state_dict(self.trainable.state_dict())

    def rollout_state(self):
        """The lagging rollout weights (for an exact resume), or None when there is no copy."""
        return None if self.rollout_copy is None else self.rollout_copy.state_dict()

    def load_rollout_state(self, state_dict):
        if self.rollout_copy is not None:
            self.rollout_copy.load_state_dict(state_dict if state_dict is not None else self.trainable.state_dict())

    def save_weights(self, path, *, weights, ema_shadows=None):
        """A model folder at `path`: `weights` (the full, gathered state dict), with the EMA
        values put in by name when `ema_shadows` is given."""
        state = mix_into(weights, ema_shadows) if ema_shadows is not None else weights
        write_model_folder(path, model=self.trainable, state_dict=state)


TRAIN_ADAPTER, ROLLOUT_ADAPTER = "policy", "rollout"  # not "train": nn.Module.train exists


def lora_targets_matched(model, targets):
    """{target: number of modules it names} with peft's rule for a list of targets: a module
    matches when its name equals the target or ends with '.' + target. `model` may live on
    the meta device (the check runs before any weight loads)."""
    names = [name for name, _ in model.named_modules()]
    return {t: sum(name == t or name.endswith("." + t) for name in names) for t in targets}


class LoRAFineTune:
    """LoRA adapters on one base UNet or SD3 transformer (docs/design.md, "Model families").

    - the trainable adapter `policy` (peft's default init: B = 0, so at step 0 the model equals
      the base);
    - the reference is the same base with the adapters disabled: no second UNet;
    - a lagging rollout model is a second, frozen adapter `rollout` on the same base, selected
      only while the rollout runs.

    peft's `set_adapter` / `enable_adapters` also set requires_grad (active adapter trainable,
    the others frozen), so what trains is selected by adapter name, not by requires_grad.
    """
    kind = "lora"
    weights_dir, ema_dir = "lora", "lora_ema"

    def __init__(self, *, base, rank, target_modules, alpha=None, lagging=False, save_merged=False, seed=0,
                 component="unet", pipeline_class="StableDiffusionPipeline", converts=True):
        """`component`: the pipeline attribute the adapters load into (the family's
        `denoiser_folder`); `pipeline_class`: whose `save_lora_weights` writes them;
        `converts`: peft's keys converted to diffusers' layout first (the family's answer)."""
        from peft import LoraConfig
        self.component, self.pipeline_class, self.converts = component, pipeline_class, converts
        self.trainable = base
        self.save_merged = save_merged
        base.requires_grad_(False)  # only the adapters train (peft leaves the base's flags as they were)
        self.config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank,
                                 target_modules=list(target_modules), init_lora_weights=True)
        # peft draws A (Kaiming-uniform) from the global generator: seeded here, so two runs
        # with the same --seed start from the same adapter (an exact resume compares them)
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            torch.manual_seed(seed)
            # peft warns about a second adapter on one model: that is the design here
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            base.add_adapter(self.config, adapter_name=TRAIN_ADAPTER)
            self.lagging = lagging
            if lagging:  # initialised anyway; refresh_rollout copies the trainable adapter in
                base.add_adapter(LoraConfig(**{k: getattr(self.config, k) for k in ("r", "lora_alpha", "target_modules",
                                                                                      "init_lora_weights")}),
                                 adapter_name=ROLLOUT_ADAPTER)
        base.set_adapter(TRAIN_ADAPTER)  # add_adapter activated the last one added
        self._named = [(n, p) for n, p in base.named_parameters() if f".{TRAIN_ADAPTER}." in n]
        self._rollout = [(n, p) for n, p in base.named_parameters() if f".{ROLLOUT_ADAPTER}." in n]
        if not self._named:
            raise ValueError("LoRA: no adapter parameters were created")

    def named_trainable(self):
        return list(self._named)

    @contextlib.contextmanager
    def reference(self):
        """The base model: the adapters disabled for the duration, re-enabled (and the train
        adapter trainable again) after."""
        self.trainable.disable_adapters()
        try:
            yield self.trainable
        finally:
            self.trainable.enable_adapters()
            self.trainable.set_adapter(TRAIN_ADAPTER)

    @property
    def rollout_model(self):
        return _WithAdapter(self.trainable, ROLLOUT_ADAPTER) if self.lagging else self.trainable

    @torch.no_grad()
    def refresh_rollout(self):
        if not self.lagging:  # rollouts use the trainable adapter itself
            return
        for (_, dst), (_, src) in zip(self._rollout, self._named, strict=True):
            dst.copy_(src)

    def rollout_state(self):
        if not self.lagging:
            return None
        return {n: p.detach().clone() for n, p in self._rollout}

    @torch.no_grad()
    def load_rollout_state(self, state_dict):
        if not self.lagging:
            return
        if state_dict is None:
            self.refresh_rollout()
            return
        if set(state_dict) != {n for n, _ in self._rollout}:
            raise ValueError("rollout adapter state: its parameters differ from the model's rollout adapter")
        for n, p in self._rollout:
            p.copy_(state_dict[n])

    def adapter_layers(self, values):
        """{name: tensor} of the train adapter in diffusers' LoRA layout (`values` by parameter
        name: the trained weights or the EMA), what `save_lora_weights` writes."""
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict
        state = get_peft_model_state_dict(self.trainable, state_dict=values, adapter_name=TRAIN_ADAPTER)
        return convert_state_dict_to_diffusers(state) if self.converts else state

    def save_weights(self, path, *, weights, ema_shadows=None):
        """LoRA weights at `path` in the layout `pipe.load_lora_weights(path)` reads; `weights`
        is the full state dict, the EMA values replace the adapter's when given."""
        import diffusers
        values = {n: weights[n] for n, _ in self._named}
        if ema_shadows is not None:
            values = mix_into(values, ema_shadows)
        layers = {k: v.detach().to("cpu").contiguous() for k, v in self.adapter_layers(values).items()}
        # The SD1.5 and SDXL loaders read the same file (unet.* keys), SD3's transformer.* keys;
        # the metadata carries lora_alpha, which cannot be inferred from the shapes.
        pipeline = getattr(diffusers, self.pipeline_class)
        pipeline.save_lora_weights(path, **{f"{self.component}_lora_layers": layers,
                                            f"{self.component}_lora_adapter_metadata": self.config.to_dict()})

    @torch.no_grad()
    def merged_state_dict(self, weights, ema_shadows=None):
        """The base model's state dict (diffusers' plain UNet keys) with the train adapter
        (or its EMA) merged in: W + scaling * delta, by peft's own `get_delta_weight`."""
        from peft.tuners.lora import LoraLayer
        values = dict(ema_shadows) if ema_shadows is not None else {n: weights[n] for n, _ in self._named}
        params = dict(self._named)
        saved = {n: p.detach().clone() for n, p in params.items()}
        for n, v in values.items():
            params[n].copy_(v)
        try:
            deltas = {}
            for name, module in self.trainable.named_modules():
                if isinstance(module, LoraLayer) and TRAIN_ADAPTER in module.lora_A:
                    deltas[f"{name}.weight"] = module.get_delta_weight(TRAIN_ADAPTER).detach().to("cpu")
        finally:
            for n, p in params.items():
                p.copy_(saved[n])
        out = {}
        for k, v in weights.items():
            if ".lora_" in k:
                continue
            plain = k.replace(".base_layer.", ".")
            out[plain] = (v.float() + deltas[plain].float()).to(v.dtype) if plain in deltas else v
        return out

    def save_merged_unet(self, path, *, weights, ema_shadows=None):
        """A plain diffusers UNet folder (loads with `--unet`) with the adapter merged in."""
        state = self.merged_state_dict(weights, ema_shadows)
        os.makedirs(path, exist_ok=True)
        self.trainable.save_config(path)
        save_file({k: v.detach().to("cpu").contiguous() for k, v in state.items()},
                  os.path.join(path, SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})


class _WithAdapter:
    """`model` with `adapter` active for each call (the lagging rollout adapter), the train
    adapter active again after; attributes (config, dtype, ...) are the model's."""

    def __init__(self, model, adapter):
        self._model, self._adapter = model, adapter

    def __getattr__(self, name):
        return getattr(self._model, name)

    def __call__(self, *args, **kwargs):
        self._model.set_adapter(self._adapter)
        try:
            return self._model(*args, **kwargs)
        finally:
            self._model.set_adapter(TRAIN_ADAPTER)

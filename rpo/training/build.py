"""Options -> a run (docs/design.md, "The run's parts"): the model family, the data, the
accelerator, the models and their parametrisation, the optimizer, the resumable state, the
pair source, the objective and the validator, wired into one `TrainLoop`.

Everything a user can get wrong is checked before any weight loads: the option table
(rpo/training/options.py), the family's refusals, paths, datasets, the resume.
"""
import contextlib
import json
import math
import os
import time
from types import SimpleNamespace

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from rpo import families
from rpo.cli import UserError, check_writable, cpu_ranks
from rpo.data.folders import ExpertBatches, ExpertDataset, PromptDataset
from rpo.generate import check_unet_path
from rpo.io import write_json
from rpo.lock import DirectoryLock
from rpo.models import DTYPES, check_pipeline_folder, offline_unless_hub_reachable
from rpo.scores import load_scorer
from rpo.training import checkpoint, options
from rpo.training.ema import NamedEMA
from rpo.training.latents import encode_moments
from rpo.training.loop import Cadence, TrainLoop
from rpo.training.objectives import OBJECTIVES
from rpo.training.parametrisation import FullFineTune, LoRAFineTune, lora_targets_matched
from rpo.training.plots import append_history, truncate_history
from rpo.training.rollouts import Refiller, RolloutSettings, truncation_applies
from rpo.training.sources import SOURCES
from rpo.training.speed import speed_up, unets_of
from rpo.training.state import TrainState, check_resume, load_checkpoint, read_trainer
from rpo.training.validation import ValidationSettings, Validator, trackers_of


def build(args, parser):
    """The `TrainLoop` of the options `args` (parsed by `parser`), resumed where asked."""
    family, data = check_before_loading(args)
    resume_from = checkpoint.resolve_resume(args.logdir, args.resume)  # verifies the state's checksums
    trainer = read_trainer(resume_from[1]) if resume_from else None
    accelerator = Accelerator(cpu=cpu_ranks(), mixed_precision=args.mixed_precision,
                              gradient_accumulation_steps=args.gradient_accumulation_steps,
                              log_with=trackers_of(args.report_to),
                              project_config=ProjectConfiguration(project_dir=args.logdir, logging_dir=args.logdir))
    # one writer per logdir, from before the first write to the end of the run (TrainLoop.run closes it)
    guards = contextlib.ExitStack()
    if accelerator.is_main_process:
        guards.enter_context(DirectoryLock(args.logdir, what="--logdir"))
    try:
        return build_locked(args, parser, family, data, accelerator, trainer, resume_from, guards)
    except BaseException:
        guards.close()
        raise


def build_locked(args, parser, family, data, accelerator, trainer, resume_from, guards):
    if trainer is not None:
        check_resume(trainer, path=resume_from[1], world=accelerator.num_processes, args=vars(args),
                     invariants=options.resume_invariants(parser),
                     defaults={a.dest: a.default for a in parser._actions})
    elif accelerator.is_main_process:
        checkpoint.check_fresh_logdir(args.logdir, args.overwrite)
    options.check_engine(args, accelerator.distributed_type.name)
    if args.lora_rank:
        check_lora_targets(args, family)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    # The scorer loads now, before the diffusion models: a missing metric fails at start-up,
    # not after hours. It waits in CPU memory and visits the GPU only while validating.
    scorer = load_scorer(args.score, weights_dir=args.weights_dir, hps_version=args.hps_version) if args.score else None
    models = load_models(args, family, accelerator, data.experts)
    loop = assemble(args, family, data, accelerator, models, scorer, trainer, resume_from)
    loop.guards = guards
    return loop


def check_before_loading(args):
    """The option table, hub reachability, paths and datasets, the family and its
    refusals, the schedule: (family instance, data) — no weight has loaded yet."""
    options.check(args)
    trackers_of(args.report_to)  # an unknown or uninstalled tracker fails now, not after the weights load
    if args.export_pipeline:
        from tools.export_pipeline import check_export_output
        check_export_output(args.export_pipeline)
    # without network a hub id would cost minutes of retries: switch to offline at once instead
    offline_unless_hub_reachable([p for p in (args.pretrained_model_name_or_path, args.unet, args.reference_unet,
                                              args.vae, args.train_dataset_name) if p is not None]
                                 + ([args.weights_dir] if args.score else []))
    check_writable(args.logdir, "--logdir")
    experts = ExpertDataset(None if args.train_dataset_name else args.train_dataset, args.resolution, args.random_flip,
                            args.random_crop, dataset_name=args.train_dataset_name, image_column=args.image_column,
                            caption_column=args.caption_column, cache_dir=args.cache_dir)
    prompts = PromptDataset(args.validation_dataset, what="validation dataset") if args.validation_steps else None
    check_pipeline_folder(args.pretrained_model_name_or_path, sdxl=args.sdxl)
    check_unet_path(args.unet, what="--unet")
    check_unet_path(args.reference_unet, what="--reference_unet")
    hub = {"revision": args.revision, "cache_dir": args.cache_dir}
    cls = families.resolve(args.model_family, args.pretrained_model_name_or_path, sdxl=args.sdxl, **hub)
    options.check(args, cls)
    family = cls.from_pretrained(args.pretrained_model_name_or_path, **hub)
    if args.buffer_num_inference_steps > family.num_train_timesteps:
        raise UserError(f"--buffer_num_inference_steps exceeds the {family.num_train_timesteps} training timesteps")
    return family, SimpleNamespace(experts=experts, prompts=prompts)


def check_lora_targets(args, family):
    """Refuse --lora_target_modules entries that name no module of the network that trains,
    from its config alone (built on the meta device: no weights read)."""
    cls, hub = family.denoiser_class, {"revision": args.revision, "cache_dir": args.cache_dir}
    if args.unet:
        config = cls.load_config(args.unet, cache_dir=args.cache_dir)
    else:
        config = cls.load_config(args.pretrained_model_name_or_path, subfolder=family.denoiser_folder, **hub)
    with torch.device("meta"):
        arch = cls.from_config(config)
    unmatched = [t for t, n in lora_targets_matched(arch, options.lora_targets(args)).items() if n == 0]
    if unmatched:
        raise UserError(f"--lora_target_modules: {', '.join(unmatched)} names no module of the {family.denoiser_folder} "
                        f"(e.g. {', '.join(family.lora_targets)})")


def load_models(args, family, accelerator, experts):
    """Text encoders, VAE, and the parametrisation of the network that trains: full
    (trainable, frozen reference, a lagging rollout copy when needed) or LoRA."""
    device, source = accelerator.device, args.pretrained_model_name_or_path
    hub = {"revision": args.revision, "cache_dir": args.cache_dir}
    weight_dtype = DTYPES[args.mixed_precision]
    # The paper's code trains in pure bf16 (weights, grads, AdamW state, EMA); fp16 and
    # --fp32_master_weights keep fp32 master weights under autocast instead.
    train_dtype = torch.float32 if args.mixed_precision == "fp16" or args.fp32_master_weights else weight_dtype
    text = family.load_text(source, variant=args.variant, dtype=weight_dtype, device=device,
                            captions=[item.caption for item in experts.items],
                            keep_encoders=bool(args.validation_steps), **hub)  # validation encodes its own prompts
    vae = family.load_vae(source, variant=args.variant, dtype=weight_dtype, vae=args.vae, **hub).to(device)

    def load(path, dtype, what):  # a folder of its own (--unet, --reference_unet), or the pipeline's
        if path:
            return family.load_denoiser(path, dtype=dtype, what=what, cache_dir=args.cache_dir).to(device)
        return family.load_denoiser(source, subfolder=family.denoiser_folder, variant=args.variant, dtype=dtype,
                                    what=what, **hub).to(device)
    name = family.denoiser_folder.replace("unet", "UNet")
    trainable = load(args.unet, train_dtype, f"trainable {name} (--unet)")
    objective = OBJECTIVES[args.objective]
    trainable.train()
    if args.gradient_checkpointing:
        trainable.enable_gradient_checkpointing()
    # A lagging rollout model needs its own copy (rpo/training/parametrisation.py); SFT rolls nothing out
    lagging = args.gradient_accumulation_steps % args.buffer_update_steps != 0 and objective.needs_reference
    if args.lora_rank:
        params = LoRAFineTune(base=trainable, rank=args.lora_rank, alpha=args.lora_alpha, lagging=lagging,
                              target_modules=options.lora_targets(args), save_merged=args.save_merged_unet,
                              seed=args.seed, component=family.denoiser_folder, converts=family.lora_converts,
                              pipeline_class=family.pipeline_class)
    else:  # LoRA's reference is the base with adapters disabled; SFT has no reference
        reference = load(args.reference_unet, weight_dtype, f"reference {name}").requires_grad_(False) \
            if objective.needs_reference else None
        rollout = load(args.unet, weight_dtype, f"rollout {name}").requires_grad_(False) if lagging else None
        params = FullFineTune(trainable=trainable, reference=reference, rollout=rollout)
    return SimpleNamespace(text=text, vae=vae, params=params, weight_dtype=weight_dtype)


def assemble(args, family, data, accelerator, models, scorer, trainer, resume_from):
    """Optimizer, state (fresh or restored), data loader, pair source, objective and
    validator around the loaded models: the `TrainLoop`."""
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    params, experts = models.params, data.experts
    ema = NamedEMA(params.named_trainable(), offload=args.offload_ema) if args.use_ema else None
    lr = args.learning_rate * (args.gradient_accumulation_steps * args.batch_size * world if args.scale_lr else 1)
    optimizer = torch.optim.AdamW([p for _, p in params.named_trainable()], lr=lr)
    num_updates = math.ceil(args.num_steps / args.gradient_accumulation_steps)
    # accelerate's wrapped scheduler ticks once per process at each optimizer update
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer,
                                 num_warmup_steps=args.lr_warmup_steps // args.gradient_accumulation_steps * world,
                                 num_training_steps=num_updates * world)
    if accelerator.state.deepspeed_plugin is not None:  # no DataLoader is prepared: DeepSpeed needs the batch size
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = args.batch_size
    model, optimizer, lr_scheduler = accelerator.prepare(params.trainable, optimizer, lr_scheduler)

    state = TrainState.fresh(seed=args.seed, rank=rank, buffer_size=args.buffer_size * (world if args.buffer_sync else 1),
                             device=device)
    if trainer is not None:
        restore(args, trainer, resume_from[1], accelerator, params, ema, state, optimizer, lr_scheduler, lr)
    else:
        params.refresh_rollout()
        if args.resume == "latest":
            accelerator.print(f"--resume latest: no resumable checkpoint in {args.logdir}, starting fresh")
    if accelerator.is_main_process:
        checkpoint.clean_temporaries(args.logdir)  # what a crash mid-save left behind
        record_start(args, resume_from)
        accelerator.init_trackers("rpo", config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))})
        truncate_history(args.logdir, state.step)  # lines a killed run wrote after its checkpoint come again

    objective = OBJECTIVES[args.objective].from_options(args)
    source_cls = SOURCES[objective.source or args.buffer_mode]
    refiller = make_refiller(args, family, accelerator, models, experts, state, source_cls)
    source = source_cls.from_options(args, refiller=refiller, params=params, family=family)
    speed_up(unets_of(params), compile=args.compile, channels_last=args.channels_last)
    validator = make_validator(args, family, accelerator, models, data.prompts, scorer)
    if accelerator.is_main_process:
        print_summary(args, len(experts), world, num_updates, state.step, validator)
    on_end = (lambda final: export_pipeline(final, args)) if args.export_pipeline else None
    cadence = Cadence(num_steps=args.num_steps, accumulation=args.gradient_accumulation_steps,
                      rollout_refresh=args.buffer_update_steps, checkpoint=args.checkpointing_steps,
                      validation=args.validation_steps, keep=args.checkpoints_total_limit,
                      keep_weights=args.checkpoints_keep_weights)
    return TrainLoop(accelerator=accelerator, model=model, params=params, family=family, source=source,
                     objective=objective, optimizer=optimizer, lr_scheduler=lr_scheduler, ema=ema, state=state,
                     cadence=cadence, max_grad_norm=args.max_grad_norm, logdir=args.logdir, args=vars(args),
                     batch_size=args.batch_size, validator=validator, on_end=on_end)


def export_pipeline(final, args):
    """--export_pipeline: the last checkpoint as a complete diffusers pipeline folder."""
    from tools.export_pipeline import export
    export(final, args.export_pipeline, base=args.pretrained_model_name_or_path)
    print(f"exported {final} as a pipeline -> {args.export_pipeline}")


def restore(args, trainer, path, accelerator, params, ema, state, optimizer, lr_scheduler, lr):
    load_checkpoint(path=path, trainer=trainer, accelerator=accelerator, params=params, ema=ema, state=state)
    accelerator.step = state.step
    accelerator.print(f"resumed from {path} at micro-step {state.step}")
    for name in options.RESUME_CHANGEABLE:
        if trainer["args"].get(name) != getattr(args, name):
            accelerator.print(f"--resume: --{name} changed from {trainer['args'].get(name)!r} to {getattr(args, name)!r}")
    set_learning_rate(optimizer, lr_scheduler, lr)  # the restored optimizer and scheduler hold the old one


def make_refiller(args, family, accelerator, models, experts, state, source_cls):
    """The expert loader (this rank's shard, from the state's position, in the batches
    `source_cls` draws) and the rollouts on it."""
    moments = None
    if args.cache_latents:  # before the loader: it then skips decoding pixels
        moments = encode_moments(models.vae, experts, accelerator.device, models.weight_dtype)
        experts.load_pixels = False
    batches = ExpertBatches(len(experts), source_cls.expert_batch_size(args), args.seed, accelerator.process_index,
                            accelerator.num_processes, start=state.expert_batches_used)
    loader = iter(torch.utils.data.DataLoader(experts, batch_sampler=batches, num_workers=args.dataloader_num_workers,
                                              pin_memory=accelerator.device.type == "cuda", persistent_workers=False))
    return Refiller(batches=loader, text=models.text, vae=models.vae, family=family, accelerator=accelerator,
                    weight_dtype=models.weight_dtype, moments=moments, settings=RolloutSettings(
                        scheduler=args.buffer_scheduler, num_steps=args.buffer_num_inference_steps,
                        batch_size=args.buffer_batch_size, batches_per_refill=args.buffer_batch_accumulation,
                        min_trajectories=args.batch_size, guidance_scale=args.buffer_guidance_scale,
                        perturb_timesteps=args.buffer_perturb_timesteps,
                        drop_prompt_probability=args.random_drop_prompt_probability, resolution=args.resolution,
                        latent_size=family.latent_size(models.vae, args.resolution), sync=args.buffer_sync,
                        truncate=source_cls.truncatable and truncate(args, accelerator)))


def truncate(args, accelerator):
    """Truncated rollouts: on where exact (`truncation_applies`), unless --no-truncate_rollouts."""
    exact, why = truncation_applies(buffer_size=args.buffer_size, sample_steps=args.buffer_sample_steps,
                                    pair_batch_size=args.batch_size, rollout_batch_size=args.buffer_batch_size,
                                    batches_per_refill=args.buffer_batch_accumulation, sync=args.buffer_sync,
                                    world=accelerator.num_processes)
    if args.truncate_rollouts and not exact:
        accelerator.print(f"--truncate_rollouts: rollouts stay whole, truncation would not be exact: {why}")
    return exact and args.truncate_rollouts is not False


def make_validator(args, family, accelerator, models, prompts, scorer):
    if prompts is None:
        return None
    return Validator(accelerator=accelerator, captions=[item.caption for item in prompts.items], text=models.text,
                     vae=models.vae, family=family, logdir=args.logdir, scorer=scorer, score_name=args.score,
                     settings=ValidationSettings(
                         scheduler=args.validation_scheduler, num_inference_steps=args.validation_num_inference_steps,
                         guidance_scale=args.validation_guidance_scale, resolution=args.resolution, seed=args.seed,
                         images_per_prompt=args.score_num_images_per_prompt, batch_size=args.score_batch_size),
                     on_score=lambda step, logs: append_history(args.logdir, {"kind": "validation", "step": step, **logs}))


def print_summary(args, examples, world, num_updates, start, validator):
    """What this run will do and where its outputs go, printed once at start-up."""
    effective = args.batch_size * args.gradient_accumulation_steps * world
    remaining = args.num_steps - start
    lines = [f"training: {examples} expert examples; effective batch {effective} = {args.batch_size} per process x "
             f"{args.gradient_accumulation_steps} accumulation x {world} process{'es' if world > 1 else ''}",
             f"  {args.num_steps} micro-steps = {num_updates} optimizer updates"
             + (f"; resuming at micro-step {start}, {remaining} to go" if start else ""),
             f"  checkpoints every {args.checkpointing_steps} micro-steps -> {os.path.join(args.logdir, 'ckpt-N')}",
             f"  history -> {os.path.join(args.logdir, 'history.jsonl')}, plots -> {os.path.join(args.logdir, 'plots')}"]
    if validator is not None:
        lines.append(f"  validation of {validator.num_images()} images at step 0 and every {args.validation_steps} "
                     f"micro-steps -> {os.path.join(args.logdir, 'images')}")
    if args.export_pipeline:
        lines.append(f"  at the end, a diffusers pipeline -> {args.export_pipeline}")
    tqdm.write("\n".join(lines))


def set_learning_rate(optimizer, lr_scheduler, lr):
    """Make `lr` the base learning rate of a restored optimizer and LR scheduler (both
    remember the one they were saved with), keeping the schedule's position."""
    scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate wraps it
    scheduler.base_lrs = [lr for _ in optimizer.param_groups]
    for group, lmbda in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = lr
        group["lr"] = lr * lmbda(scheduler.last_epoch)


def record_start(args, resume_from):
    """Append this start (fresh or resumed, with every option) to <logdir>/training_config.json."""
    path = os.path.join(args.logdir, "training_config.json")
    runs = []
    if resume_from is not None and os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        runs = old.get("runs", []) if isinstance(old, dict) and "runs" in old else [{"resumed_from": None, "args": old}]
    runs.append({"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "resumed_from": resume_from[1] if resume_from else None,
                 "args": vars(args)})
    os.makedirs(args.logdir, exist_ok=True)
    write_json(path, {"runs": runs}, indent=2)

#!/usr/bin/env bash
# The offline main job: the whole pipeline on the tiny kit, on the CPU, with the paper's
# commands (shortened; docs/papers-readme.md). Builds stand-ins for every model and dataset, builds the training
# and test sets with the dataset tools, trains, resumes, generates (trained and base model on the
# same seeds) and scores, ending with an HTML report comparing the two.
# Everything lands under $DEMO_DIR (default ./demo).
set -euo pipefail
PY=${PYTHON:-python}
OUT=${DEMO_DIR:-./demo}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
rm -rf "$OUT"
step() { printf '\n=== %s\n' "$*"; }

step "1/6 tiny kit: models, scorers and datasets in the real on-disk layouts"
for kind in sd15 scorers pickapic hpdv2; do $PY -m rpo.tiny "$kind" "$OUT/tiny/$kind"; done

step "2/6 datasets: top Pick-a-Pic images by HPSv2 (train), best image per test prompt, HPDv2 photo style"
$PY -m tools.pickapic --dataset "$OUT/tiny/pickapic" --weights_dir "$OUT/tiny/scorers" \
  --cache "$OUT/data/cache" --version v2 --split train --score hpsv2 --top 8 --batch_size 8 \
  --no-preferred --output "$OUT/data/pickapicv2_hpsv2_nopreferred_8"
$PY -m tools.pickapic --dataset "$OUT/tiny/pickapic" --weights_dir "$OUT/tiny/scorers" \
  --cache "$OUT/data/cache" --version v2 --split test_unique --score pickscore --top 1 --per_caption \
  --batch_size 8 --no-preferred --output "$OUT/data/pickapicv2_pickscore_test"
$PY -m tools.hpdv2_benchmark --repo "$OUT/tiny/hpdv2" --weights_dir "$OUT/tiny/scorers" \
  --cache "$OUT/data/cache" --batch_size 8 --styles photo --output "$OUT/data/hpdv2_{style}"

step "3/6 train: the paper's command (fp32: bf16 is slow on CPUs), 8 micro-steps, checkpoint and validation every 4 (stops at 4, then resumes)"
train() {
  $PY train.py \
    --pretrained_model_name_or_path "$OUT/tiny/sd15" \
    --train_dataset "$OUT/data/pickapicv2_hpsv2_nopreferred_8" \
    --validation_dataset "$OUT/data/pickapicv2_pickscore_test" \
    --resolution 64 --random_flip --random_drop_prompt_probability 0.2 \
    --batch_size 4 --gradient_accumulation_steps 2 --learning_rate 1e-4 \
    --hinge --margin 0.001 \
    --validation_steps 4 --validation_scheduler DDPM --validation_num_inference_steps 50 \
    --validation_guidance_scale 7.5 --score pickscore --weights_dir "$OUT/tiny/scorers" \
    --buffer_batch_size 4 --buffer_batch_accumulation 1 --buffer_scheduler DPMSolver++ \
    --buffer_num_inference_steps 20 --buffer_guidance_scale 1.0 --buffer_sample_steps 1 \
    --buffer_update_steps 16 --buffer_size 4 --buffer_perturb_timesteps --no-buffer_sync \
    --checkpointing_steps 4 --use_ema --offload_ema --mixed_precision no \
    --dataloader_num_workers 0 --logdir "$OUT/logs/sd15_demo" "$@"
}
train --num_steps 4
train --num_steps 8 --resume latest
$PY - "$OUT/logs/sd15_demo/ckpt-8" <<'PY'
import sys
from safetensors.torch import load_file
ckpt = sys.argv[1]
ema = load_file(f"{ckpt}/ema/diffusion_pytorch_model.safetensors")
raw = load_file(f"{ckpt}/unet/diffusion_pytorch_model.safetensors")
print(f"ckpt-8: max |ema - unet| = {max((ema[k].float() - raw[k].float()).abs().max().item() for k in raw):.3g}")
PY

step "4/6 generate: Pick-a-Pic test prompts and HPDv2 photo prompts from ckpt-8/ema, and the base model on the same seeds"
generate() {  # $1 prompt set, $2 output name, then extra options
  local set=$1 name=$2; shift 2
  $PY inference.py --pretrained_model_name_or_path "$OUT/tiny/sd15" --test_dataset_root "$OUT/data/$set" \
    --batch_size 4 --num_images_per_prompt 2 --mixed_precision no --scheduler DDPM \
    --num_inference_steps 10 --guidance_scale 7.5 --seed 0 --resolution 64 --num_workers 0 \
    --output "$OUT/output/$name" "$@"
}
for set in pickapicv2_pickscore_test hpdv2_photo; do
  generate "$set" "$set" --unet "$OUT/logs/sd15_demo/ckpt-8/ema"
done
generate pickapicv2_pickscore_test base_pickapicv2_pickscore_test

step "5/6 score: all six metrics, win rates against the base model, and an HTML report"
$PY score.py --batch_size 8 --num_workers 0 --weights_dir "$OUT/tiny/scorers" --output "$OUT" \
  --pickscore --hpsv2 --aestheticv1 --aestheticv2 --clip --imagereward \
  --dir "$OUT/output/pickapicv2_pickscore_test" --dir "$OUT/output/hpdv2_photo"
# trained vs base on the same prompts and seeds (scores come from the per-folder caches)
$PY score.py --batch_size 8 --num_workers 0 --weights_dir "$OUT/tiny/scorers" --output "$OUT/compare" \
  --pickscore --hpsv2 --aestheticv1 --aestheticv2 --clip --imagereward \
  --dir "$OUT/output/pickapicv2_pickscore_test" --compare "$OUT/output/base_pickapicv2_pickscore_test" \
  --report "$OUT/report.html"

step "6/6 where things are"
echo "tiny models and data:  $OUT/tiny"
echo "built datasets:        $OUT/data"
echo "logs (TensorBoard):    $OUT/logs/sd15_demo"
echo "validation grids:      $OUT/logs/sd15_demo/images/step-{0,4,8}.png (step 0: the base model)"
echo "plots:                 $OUT/logs/sd15_demo/plots"
echo "checkpoint (EMA UNet): $OUT/logs/sd15_demo/ckpt-8/ema"
echo "generated images:      $OUT/output"
echo "score table:           $OUT/scores.csv, $OUT/scores.json (win rates: $OUT/compare)"
echo "report (open offline): $OUT/report.html"

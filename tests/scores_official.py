"""The official scorer code on the tiny weights — run by tests/test_scores_parity.py with
the python of the set-B virtual environment (requirements-parity.txt), never imported by
the project.

    python tests/scores_official.py WEIGHTS_DIR PAIRS_JSON OUT_JSON

PAIRS_JSON: [[image path, prompt], ...]. OUT_JSON: {metric: [score per pair], ...,
"imagereward_unloaded": [official keys the checkpoint did not fill]}.

- hpsv2 (the hpsv2x package): its own `img_score.score` — vendored open_clip model and
  evaluation transform, its tokenizer, `torch.load(cp)['state_dict']` — with the tiny
  architecture registered as a model config and put in its model cache (its initializer
  would download the 4 GB LAION weights first). Reported x100, as the paper reports it.
- imagereward (image-reward 1.5): `ImageReward.load(path, med_config=...)` and
  `model.score(prompt, path)`, with the three hard-coded sizes patched: `create_vit`
  (ViT-L), `init_tokenizer` (bert-base-uncased from the hub) and `MLP(768)`.
- pickscore: the PickScore README's code (CLIPProcessor/AutoModel, transformers 4.55).
- aestheticv1/v2: improved-aesthetic-predictor's recipe on transformers 4.55's
  `CLIPModel.get_image_features` and `CLIPImageProcessor` (the PIL one), with the head
  classes of the releases (nn.Linear; ImageReward's copy of the MLP).
- clip: the vendored open_clip of hpsv2 with its letterbox transform, raw cosine.
"""
import json
import os
import sys
import tempfile

import torch
from PIL import Image


def hpsv2_scores(weights, pairs):
    from hpsv2 import img_score
    from hpsv2.src.open_clip import add_model_config, create_model_and_transforms
    with open(os.path.join(weights, "hpsv2", "open_clip_config.json")) as f:
        config = json.load(f)["model_cfg"]
    folder = tempfile.mkdtemp()
    with open(os.path.join(folder, "HPS-tiny.json"), "w") as f:
        json.dump(config, f)
    add_model_config(os.path.join(folder, "HPS-tiny.json"))
    # the arguments of hpsv2.img_score.initialize_model, but the tiny architecture and no LAION download
    model, _, preprocess_val = create_model_and_transforms(
        "HPS-tiny", None, precision="amp", device="cpu", jit=False, force_quick_gelu=False, force_custom_text=False,
        force_patch_dropout=False, force_image_size=None, pretrained_image=False, image_mean=None, image_std=None,
        light_augmentation=True, aug_cfg={}, output_dict=True, with_score_predictor=False, with_region_predictor=False)
    img_score.model_dict["model"] = model
    img_score.model_dict["preprocess_val"] = preprocess_val
    out = {}
    for version, filename in (("v2.0", "HPS_v2_compressed.pt"), ("v2.1", "HPS_v2.1_compressed.pt")):
        cp = os.path.join(weights, "hpsv2", filename)
        out[f"hpsv2_{version}"] = [100 * float(img_score.score(path, prompt, cp=cp, hps_version=version)[0])
                                   for path, prompt in pairs]
    return out


def imagereward_scores(weights, pairs):
    import ImageReward as RM
    from ImageReward.models.BLIP import blip_pretrain
    from ImageReward.models.BLIP.vit import VisionTransformer
    from transformers import BertTokenizer
    folder = os.path.join(weights, "imagereward")
    with open(os.path.join(folder, "vision_config.json")) as f:
        vit = json.load(f)
    with open(os.path.join(folder, "med_config.json")) as f:
        hidden = json.load(f)["hidden_size"]

    def create_vit(name, image_size, use_grad_checkpointing=False, ckpt_layer=0, drop_path_rate=0):
        encoder = VisionTransformer(img_size=vit["image_size"], patch_size=vit["patch_size"], embed_dim=vit["embed_dim"],
                                    depth=vit["depth"], num_heads=vit["num_heads"],
                                    use_grad_checkpointing=use_grad_checkpointing, ckpt_layer=ckpt_layer,
                                    drop_path_rate=drop_path_rate)
        return encoder, vit["embed_dim"]

    def init_tokenizer():  # the original, reading the local vocabulary instead of the hub's
        tokenizer = BertTokenizer.from_pretrained(os.path.join(folder, "tokenizer"))
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})
        tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        tokenizer.enc_token_id = tokenizer.additional_special_tokens_ids[0]
        return tokenizer

    image_reward_module = sys.modules["ImageReward.ImageReward"]  # the package re-exports a class of that name
    blip_pretrain.create_vit = create_vit
    blip_pretrain.init_tokenizer = init_tokenizer
    official_mlp = image_reward_module.MLP
    image_reward_module.MLP = lambda input_size: official_mlp(hidden)
    checkpoint = os.path.join(folder, "ImageReward.pt")
    try:
        model = RM.load(checkpoint, device="cpu", med_config=os.path.join(folder, "med_config.json"))
    finally:
        image_reward_module.MLP = official_mlp
    # RM.load uses strict=False: make sure every tensor of the model came from the file
    unloaded = sorted(set(model.state_dict()) - set(torch.load(checkpoint, map_location="cpu")))
    with torch.no_grad():
        scores = [float(model.score(prompt, path)) for path, prompt in pairs]
    return {"imagereward": scores, "imagereward_unloaded": unloaded}


def pickscore_scores(weights, pairs):
    from transformers import AutoModel, CLIPProcessor
    # the README's AutoProcessor resolves to CLIPProcessor through the hub repo's config.json,
    # which the tiny processor folder does not carry
    processor = CLIPProcessor.from_pretrained(os.path.join(weights, "pickscore", "processor"))
    model = AutoModel.from_pretrained(os.path.join(weights, "pickscore", "model")).eval()
    scores = []
    with torch.no_grad():
        for path, prompt in pairs:  # the README's calc_probs, one image at a time
            image_inputs = processor(images=[Image.open(path)], padding=True, truncation=True, max_length=77,
                                     return_tensors="pt")
            text_inputs = processor(text=prompt, padding=True, truncation=True, max_length=77, return_tensors="pt")
            image_embs = model.get_image_features(**image_inputs)
            image_embs = image_embs / torch.norm(image_embs, dim=-1, keepdim=True)
            text_embs = model.get_text_features(**text_inputs)
            text_embs = text_embs / torch.norm(text_embs, dim=-1, keepdim=True)
            scores.append(float(model.logit_scale.exp() * (text_embs @ image_embs.T)[0][0]))
    return {"pickscore": scores}


def aesthetic_scores(weights, pairs):
    from ImageReward.ImageReward import MLP
    from transformers import CLIPImageProcessor, CLIPModel
    out = {}
    for name, filename in (("aestheticv1", "sa_0_4_vit_l_14_linear.pth"), ("aestheticv2", "sac+logos+ava1-l14-linearMSE.pth")):
        clip = os.path.join(weights, name, "clip")
        model = CLIPModel.from_pretrained(clip).eval()
        processor = CLIPImageProcessor.from_pretrained(clip)
        state = torch.load(os.path.join(weights, name, filename), map_location="cpu")
        if name == "aestheticv1":
            head = torch.nn.Linear(state["weight"].shape[1], 1)
        else:
            head = MLP(state["layers.0.weight"].shape[1])
        head.load_state_dict(state)
        head.eval()
        scores = []
        with torch.no_grad():
            for path, _ in pairs:
                features = model.get_image_features(**processor(images=Image.open(path), return_tensors="pt"))
                features = features / features.norm(dim=-1, keepdim=True)
                scores.append(float(head(features)))
        out[name] = scores
    return out


def clip_scores(weights, pairs):
    from hpsv2.src.open_clip import add_model_config, create_model_and_transforms, get_tokenizer
    from safetensors.torch import load_file
    with open(os.path.join(weights, "clip", "open_clip_config.json")) as f:
        config = json.load(f)["model_cfg"]
    folder = tempfile.mkdtemp()
    with open(os.path.join(folder, "CLIP-tiny.json"), "w") as f:
        json.dump(config, f)
    add_model_config(os.path.join(folder, "CLIP-tiny.json"))
    model, _, preprocess = create_model_and_transforms("CLIP-tiny", None, precision="amp", device="cpu",
                                                       light_augmentation=True, output_dict=True)
    model.load_state_dict(load_file(os.path.join(weights, "clip", "open_clip_model.safetensors")))
    model.eval()
    tokenizer = get_tokenizer("ViT-H-14")
    scores = []
    with torch.no_grad():
        for path, prompt in pairs:
            outputs = model(preprocess(Image.open(path)).unsqueeze(0), tokenizer([prompt]))
            scores.append(float((outputs["image_features"] @ outputs["text_features"].T)[0, 0]))
    return {"clip": scores}


def main(weights, pairs_json, out_json):
    with open(pairs_json) as f:
        pairs = json.load(f)
    out = {}
    for compute in (hpsv2_scores, imagereward_scores, pickscore_scores, aesthetic_scores, clip_scores):
        out.update(compute(weights, pairs))
    with open(out_json, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main(*sys.argv[1:])

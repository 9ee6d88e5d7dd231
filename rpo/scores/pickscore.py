"""PickScore (Kirstain et al. 2023): `logit_scale.exp() * cos(image, text)` of the
`yuvalkirstain/PickScore_v1` CLIP ViT-H/14, as its README computes it (~20-22 on SD1.5).

Images go through the `laion/CLIP-ViT-H-14-laion2B-s32B-b79K` processor: shorter side to
224 (PIL bicubic), centre crop, CLIP mean/std. transformers 5 maps that processor to a
torchvision implementation whose bicubic differs from PIL's; the PIL one
(`CLIPImageProcessorPil`) is what the published numbers used. Text is padded to the
longest prompt of the batch and truncated at 77 tokens.
"""
import torch
import torch.nn.functional as F
from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

from rpo.scores.base import Scorer, check_vocabulary, from_pretrained, load_model, prepare, release_version, resolve

MODEL = "yuvalkirstain/PickScore_v1"
PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


class ImageTransform:
    """The HF image processor as a picklable image -> (3, 224, 224) function."""

    def __init__(self, processor):
        self.processor = processor
        self.key = ("hf", processor.to_json_string())   # equal keys, equal outputs

    def __call__(self, image):
        return self.processor(images=image, return_tensors="pt").pixel_values[0]


class PickScore(Scorer):
    name = "pickscore"

    def __init__(self, model, image_processor, tokenizer, device):
        super().__init__(ImageTransform(image_processor), device)
        self.model = prepare(model, device)
        self.tokenizer = tokenizer
        self.version = release_version("v1", [self.model], [self.transform, tokenizer])

    @torch.no_grad()
    def score_tensors(self, pixels, prompts):
        text = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=77, return_tensors="pt").to(self.device)
        model = self.model
        image_embeds = model.visual_projection(model.vision_model(pixel_values=pixels.to(self.device)).pooler_output)
        text_embeds = model.text_projection(model.text_model(input_ids=text.input_ids, attention_mask=text.attention_mask).pooler_output)
        cosine = (F.normalize(image_embeds, dim=-1) * F.normalize(text_embeds, dim=-1)).sum(-1)
        return (model.logit_scale.exp() * cosine).float().cpu()


def load(name="pickscore", weights_dir=None, device="cpu", **_):
    model_source, model_hint = resolve(weights_dir, "pickscore/model", MODEL, "PickScore model")
    processor_source, processor_hint = resolve(weights_dir, "pickscore/processor", PROCESSOR, "PickScore processor")
    model = load_model(CLIPModel, model_source, "PickScore model", model_hint)
    image_processor = from_pretrained(CLIPImageProcessorPil, processor_source, "PickScore image processor", processor_hint)
    tokenizer = from_pretrained(CLIPTokenizer, processor_source, "PickScore tokenizer", processor_hint)
    check_vocabulary(tokenizer, processor_source, 49408)
    return PickScore(model, image_processor, tokenizer, device)

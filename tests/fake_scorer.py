"""A stand-in scorer whose values a test can compute independently (mean of an 8x8
thumbnail plus 0.01 per caption character), shared by the dataset-tool tests. It can
also simulate a kill after a number of batches and counts what it scored."""
import numpy as np
import torch
from PIL import Image


def fake_value(image, caption):
    """Mean of the 8x8 bilinear thumbnail in [0, 1], plus 0.01 per caption character."""
    thumb = np.asarray(image.convert("RGB").resize((8, 8), Image.BILINEAR), dtype=np.float64) / 255
    return thumb.mean() + 0.01 * len(caption)


class FakeScorer:
    name, version = "fake", "1"
    scored = 0          # images scored by all instances (resume tests count rescoring)
    fail_after = None   # raise Killed once this many batches were scored (a simulated kill)

    def preprocess(self, image):
        thumb = np.asarray(image.convert("RGB").resize((8, 8), Image.BILINEAR), dtype=np.float32) / 255
        return torch.from_numpy(thumb).permute(2, 0, 1)

    def score_tensors(self, pixels, prompts):
        if FakeScorer.fail_after is not None:
            if FakeScorer.fail_after == 0:
                raise Killed()
            FakeScorer.fail_after -= 1
        FakeScorer.scored += len(prompts)
        return pixels.double().mean(dim=(1, 2, 3)).float() + 0.01 * torch.tensor([len(p) for p in prompts])


class Killed(Exception):
    pass

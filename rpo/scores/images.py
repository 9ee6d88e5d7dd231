"""Score many (image, caption) pairs with a registry scorer: decode and preprocess in
DataLoader workers, score in batches on the device.

An image that cannot be decoded (truncated or corrupt JPEG, not an image) does not stop
the run: it comes back with an error string instead of a score, for the caller to count
and report.
"""
import io

import torch
from PIL import Image

from rpo.data.folders import IMAGE_ERRORS, scorer_input


def decode_image(source):
    """A fully decoded image from encoded bytes or a file path (`scorer_input`)."""
    with Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source) as image:
        image.load()  # decode now: a truncated file fails here, not later
        return scorer_input(image)  # 16-bit scaled, not clipped; other modes as the official code sees them


class _Decoded(torch.utils.data.Dataset):
    def __init__(self, sources, preprocess):
        self.sources = sources
        self.preprocess = preprocess

    def __len__(self):
        return len(self.sources)

    def __getitem__(self, index):
        try:
            return index, self.preprocess(decode_image(self.sources[index])), None
        except IMAGE_ERRORS as e:
            return index, None, f"{type(e).__name__}: {e}".splitlines()[0]


def _as_list(batch):
    return batch


def score_images(scorer, sources, captions, batch_size, num_workers=0, device="cpu"):
    """Score `sources[i]` (bytes or path) against `captions[i]`.

    Yields one list per batch of (index, score, error): `score` is a float and `error`
    None, or `score` is None and `error` says why the image was unreadable.
    """
    loader = torch.utils.data.DataLoader(_Decoded(sources, scorer.preprocess), batch_size=batch_size,
                                         num_workers=num_workers, collate_fn=_as_list)
    for batch in loader:
        good = [(index, pixels) for index, pixels, error in batch if error is None]
        results = [(index, None, error) for index, _, error in batch if error is not None]
        if good:
            pixels = torch.stack([p for _, p in good]).to(device)
            with torch.no_grad():
                scores = scorer.score_tensors(pixels, [captions[i] for i, _ in good])
            results += [(index, float(s), None) for (index, _), s in zip(good, scores.float().cpu().tolist())]
        yield sorted(results, key=lambda r: r[0])

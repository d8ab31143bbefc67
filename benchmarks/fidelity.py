"""How far each adapter is from ``repeat`` on real gray photos with real ImageNet weights.

The photos are scikit-image's bundled samples, turned gray. The weights are the bundled Lite0 ImageNet
weights, once with Lite0's own statistics (mean = std = 0.5 on every channel, where ``sum`` is exact) and
once with the ImageNet statistics most EfficientNets use (where it is not): same stem filters, so the
second row shows what ``sum`` changes for a model trained with per-channel statistics.

    python benchmarks/fidelity.py
"""

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _common import default_output, environment, report

from gray_effnet import GrayEfficientNet
from gray_effnet.explain import equivalence

PHOTOS = ["astronaut", "brick", "camera", "cat", "chelsea", "clock", "coffee", "coins", "eagle", "grass", "gravel",
          "horse", "hubble_deep_field", "immunohistochemistry", "microaneurysms", "moon", "page", "retina", "rocket",
          "text"]
STATS = {
    "lite0 (0.5, 0.5, 0.5)": None,
    "ImageNet (0.485, 0.456, 0.406)": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
COLUMNS = ["statistics", "adapter", "stem_max_abs", "logits_max_abs", "logits_rel", "top1_agree"]


def gray_photos(size: int) -> tuple[torch.Tensor, list[str]]:
    """scikit-image's sample photos as a (N, 1, size, size) uint8 batch (luma, ITU-R 601-2)."""
    import skimage.data

    images, names = [], []
    for name in PHOTOS:
        try:
            img = np.asarray(getattr(skimage.data, name)())
        except Exception:  # noqa: BLE001 - a sample missing from this scikit-image version
            continue
        if img.dtype == bool:
            img = img.astype(np.uint8) * 255
        if img.ndim == 3:
            img = (img[..., :3] @ np.array([0.299, 0.587, 0.114])).round().astype(np.uint8)
        t = torch.from_numpy(np.ascontiguousarray(img)).float()[None, None]
        t = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        images.append(t.round().clamp(0, 255).to(torch.uint8))
        names.append(name)
    return torch.cat(images), names


def main(args: argparse.Namespace) -> None:
    x, names = gray_photos(args.img_size)
    rows = []
    with torch.no_grad():
        for label, stats in STATS.items():
            mean, std = stats if stats else (None, None)
            model = GrayEfficientNet("tf_efficientnet_lite0", adapter="repeat", pretrained=True, mean=mean, std=std)
            for r in equivalence(model.eval(), x):
                rows.append({"statistics": label, **{k: r[k] for k in COLUMNS[1:]},
                             **environment(torch.device("cpu"), "float32", model="tf_efficientnet_lite0",
                                           img_size=f"{args.img_size}x{args.img_size}", images=len(names))})
    csv_path = Path(args.csv or default_output("fidelity", ".csv"))
    notes = [f"{len(names)} scikit-image photos, gray: {', '.join(names)}. Max over the photos; logits_rel is "
             "relative to max |repeat logits|; top1_agree is the share of photos whose ImageNet top-1 is repeat's."]
    report(rows, COLUMNS, csv_path, "Adapters against repeat on real gray photos", notes)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--csv", default=None, help="default: benchmarks/results/fidelity.csv")
    main(parser.parse_args())

"""Train the digits DBMEF system on real images, then export it with ``dbmef-export``'s code path.

    python -m benchmarks.digits.train --seed 0 --out engines/digits/seed0

Everything is trained here, seeded, on scikit-learn's ``load_digits`` (1 797 real 8x8 handwritten
digits), rendered as 16x16 RGB images by ``dbmef.apps.digits.render``:

* two timm classifiers (the backbones): ``weak`` (a 2-layer ``test_resnet`` trained briefly on a
  small part of the training split, 88-92 % test accuracy) and ``strong`` (``resnet10t`` with
  shift augmentation, about 98-99 %);
* the diffusion side, with the classes Stable Diffusion uses: a tiny ``AutoencoderKL``
  (16x16 -> 4x8x8 latents, scaling factor = 1 / std of the training latents, as SD chose its
  0.18215), a tiny ``CLIPTextModel`` with a ``CLIPTokenizer`` whose vocabulary this script writes,
  and a ``UNet2DConditionModel`` trained with the epsilon objective on SD's scaled-linear schedule.
  The text encoder is trained jointly with the UNet. Conditions during training (our choice):
  50 % the positive prompt ``"a photo of a {name}."``, 40 % a set prompt in the negative
  template's form ``"the features of three,eight."`` naming 2-4 classes *including* the image's
  own (so a set prompt means "one of these"; DBMEF's negative for the true candidate lists only
  wrong classes and predicts the noise badly, the negative of a wrong candidate contains the truth),
  10 % the empty prompt.

Splits are fixed (independent of ``--seed``): 1 200 train / 597 test, stratified; of the train
split 1 000 images train the classifiers and 200 calibrate the protector (the diffusion side
trains on all 1 200). Outputs under ``--out``: ``system/`` (diffusers/timm folders, loadable with
``from_pretrained``), ``bundle-weak/`` and ``bundle-strong/`` (calibrated bundles), the split
files, ``train_config.json`` and ``train_report.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging

from dbmef.apps.digits_system import train_system
from dbmef.apps.digits_train import TrainConfig


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.digits.train", description=__doc__.split("\n")[0])
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            typ = {"int": int, "float": float, "str": str}[str(f.type)]
            p.add_argument(flag, type=typ, default=f.default)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = TrainConfig(**{f.name: getattr(a, f.name) for f in dataclasses.fields(TrainConfig)})
    report = train_system(cfg)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

"""How much a trained click corrector adds on a fold's training cases, by kind of starting mask.

The corrector trains on two kinds of starting mask (``samnnu.interactive.corrector_training``): the fold
model's predictions of its training cases, and imperfect copies of the labels
(:func:`~samnnu.interactive.corrector_training.imperfect_volume`). This script gives the simulated user of
the interactive benchmark (:func:`samnnu.interactive.simulated_user.next_click`: the deepest voxel of the
largest connected error) ``--clicks`` clicks on every ``--every``-th training case, each label on its own,
answered by the corrector (one network run per click), from both kinds of start. When the gain from the
predictions is about the gain on the validation cases and the gain from the imperfect copies is much
larger, the copies are easier to correct than the model's own errors.

    python benchmarks/corrector_starts.py --data-root ROOT -d 4 -f 0 -tr SAMUNetTrainer \\
        --corrector ROOT/nnUNet_results/.../fold_0/click_corrector.pth --predictions preds.npz -o starts.json

``--predictions``: an .npz of {case: (Z, Y, X) labels}, the model's predictions of the training cases (as
``samnnu_train_prompts --corrector`` keeps them while it trains); when the file does not hold every training
case the fold's model predicts them (no mirroring, as the corrector's training does) and the file is
written (:func:`~samnnu.interactive.corrector_training.training_predictions`, which the training uses too).
"""
from __future__ import annotations

import argparse
import sys

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", required=True)
    p.add_argument("-d", "--dataset", required=True)
    p.add_argument("-f", "--fold", default="0")
    p.add_argument("-tr", "--trainer", default=None)
    p.add_argument("--corrector", required=True, help="the trained corrector file (.pth)")
    p.add_argument("--predictions", required=True, help="npz of the training cases' predictions (read or written)")
    p.add_argument("--clicks", type=int, default=5)
    p.add_argument("--every", type=int, default=3, help="use every N-th training case (sorted by name)")
    p.add_argument("--seed", type=int, default=5, help="seed of the imperfect copies")
    p.add_argument("-o", "--output", default=None, help="JSON file for the results")
    args = p.parse_args(argv)

    from samnnu.config import setup_environment

    setup_environment(args.data_root, quiet=True)
    from samnnu.datasets import dataset_name
    from samnnu.evaluation.metrics import dice
    from samnnu.interactive.click_corrector import load_corrector, normalize_image
    from samnnu.interactive.corrector_training import fold_volumes, imperfect_volume, training_predictions
    from samnnu.interactive.simulated_user import next_click
    from samnnu.safe_io import write_json_atomic

    name = dataset_name(args.dataset)
    corrector = load_corrector(args.corrector)
    images, labels, files = fold_volumes(name, str(args.fold))
    predictions = training_predictions(name, str(args.fold), files, args.predictions, trainer=args.trainer)
    rng = np.random.default_rng(args.seed)
    curves: dict[str, list[list[float]]] = {"prediction": [], "imperfect copy": []}
    cases = sorted(labels)[::args.every]
    for case in cases:
        image = normalize_image(images[case])
        for value in (int(v) for v in np.unique(labels[case]) if v > 0):
            target = labels[case] == value
            for kind, mask in (("prediction", predictions[case] == value),
                               ("imperfect copy", imperfect_volume(target, rng))):
                clicks, curve = [], [dice(mask, target)]
                for _ in range(args.clicks):
                    click = next_click(mask, target)
                    if click is not None:
                        clicks.append(click)
                        mask = corrector(image, mask, clicks, mirroring=False)
                    curve.append(dice(mask, target))
                curves[kind].append(curve)
    results = {"corrector": str(args.corrector), "cases": len(cases), "clicks": args.clicks, "starts": {}}
    for kind, rows in curves.items():
        mean = np.mean(rows, axis=0)
        results["starts"][kind] = {"label_cases": len(rows), "mean_dice": [round(float(v), 4) for v in mean],
                                   "gain_points": round(100 * float(mean[-1] - mean[0]), 2)}
        print(f"{kind:15s} {len(rows)} label-cases: Dice {mean[0]:.4f} -> {mean[-1]:.4f} after {args.clicks} clicks "
              f"({100 * (mean[-1] - mean[0]):+.2f} points)")
    if args.output:
        write_json_atomic(args.output, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())

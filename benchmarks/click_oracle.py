"""How much can one click correct? Two ceilings for clicks on a model's predictions, from the reference.

For each case and foreground label, the simulated user of ``samnnu.interactive.simulated_user`` clicks
``--clicks`` times on the largest connected error region of the current mask (3D, face connectivity). Two
ideal answers to each click are scored:

- ``3d``: the click's whole 3D error region is corrected (what a corrector that understood the click
  perfectly would do);
- ``slice``: only the part of that region on the click's slice, connected to the click, is corrected (the
  best a click that edits its own slice can do, as the 2D refiner's edit does).

Mean Dice after 0..N clicks, over cases and labels, goes to stdout and to ``--output`` (JSON). Nothing is
trained or predicted; the predictions folder is, for example, a fold's ``validation/postprocessed``:

    python benchmarks/click_oracle.py --predictions RESULTS/.../fold_0/validation/postprocessed \\
        --labels nnUNet_raw/Dataset004_Hippocampus/labelsTr -o oracle.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

from samnnu.errors import SamnnuError
from samnnu.evaluation.metrics import dice
from samnnu.interactive.auto_prompts import deepest_voxel
from samnnu.interactive.simulated_user import largest_error


def ideal_click(cur: np.ndarray, ref: np.ndarray, mode: str) -> np.ndarray:
    """The mask after one ideal click on the largest error region of ``cur`` (``mode``: "3d" or "slice")."""
    found = largest_error(cur, ref)
    if found is None:
        return cur
    positive, region = found
    if mode == "slice":
        z, y, x = deepest_voxel(region)
        parts, _ = ndimage.label(region[z])
        region = np.zeros_like(region)
        region[z] = parts == parts[y, x]
    return cur | region if positive else cur & ~region


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--predictions", required=True, help="folder of predicted label maps (.nii.gz)")
    p.add_argument("--labels", required=True, help="folder of the reference label maps (same file names)")
    p.add_argument("--clicks", type=int, default=5)
    p.add_argument("-o", "--output", default=None, help="JSON file for the results")
    args = p.parse_args(argv)
    import SimpleITK as sitk

    files = sorted(Path(args.predictions).glob("*.nii.gz"))
    if not files:
        raise SamnnuError(f"{args.predictions}: no .nii.gz predictions")
    curves = {"3d": np.zeros(args.clicks + 1), "slice": np.zeros(args.clicks + 1)}
    n = 0
    for f in files:
        ref_file = Path(args.labels) / f.name
        if not ref_file.is_file():
            raise SamnnuError(f"{ref_file}: no reference for {f.name}")
        pred = sitk.GetArrayFromImage(sitk.ReadImage(str(f)))
        ref = sitk.GetArrayFromImage(sitk.ReadImage(str(ref_file)))
        for label in (int(v) for v in np.unique(ref) if v > 0):
            for mode, curve in curves.items():
                cur = pred == label
                curve[0] += dice(cur, ref == label)
                for k in range(1, args.clicks + 1):
                    cur = ideal_click(cur, ref == label, mode)
                    curve[k] += dice(cur, ref == label)
            n += 1
    result = {"predictions": str(args.predictions), "cases": len(files), "label_cases": n,
              "mean_dice_after_clicks": {m: [round(float(v) / n, 4) for v in c] for m, c in curves.items()}}
    for mode, values in result["mean_dice_after_clicks"].items():
        print(f"{mode:>5}: " + " ".join(f"{v:.4f}" for v in values) +
              f"  (+{100 * (values[-1] - values[0]):.2f} after {args.clicks} clicks)")
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SamnnuError as e:
        sys.exit(f"click_oracle: error: {e}")

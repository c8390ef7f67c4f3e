"""What a ``samnnu_distill`` student costs and keeps, measured against its teacher (docs/distillation.md).

Three measurements, each written to ``OUT/distillation.json`` as soon as it is done (a finished step is
not repeated when the script is run again):

- ``speed``: forward seconds per image of the teacher's and the student's image encoder at the planned
  input size, in batches of the planned batch size (median of ``--repeats`` timed passes after a warm-up);
- ``box_dice``: zero-shot box prompts on fold 0's validation cases. On every slice with a structure, each
  structure gets the tight box around its reference mask; the mask the teacher's decoder returns is
  scored against that mask with Dice. The same is done with the teacher's encoder and with the student's
  encoder (both at the distillation input size, the same prompt encoder and mask decoder);
- ``samunet``: SAMUNetTrainer trained on fold 0 for the same number of iterations with the teacher
  (LiteMedSAM, the dataset's own plans) and with the student (the same dataset planned again with
  ``--sam-checkpoint STUDENT`` in a second data root, with the same splits), validated by the chain.
  The planner gives a cheaper student a larger batch; ``--equal-batch`` sets the student's plans to the
  teacher's batch, so that both runs see the same number of samples.

    python benchmarks/distillation.py --data-root DATA -d 4 --student STUDENT.pth -o OUT [--iterations 250]

Run it alone on the machine for the speed step; say in docs/benchmarks.md what else was running.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path


def _save(out: Path, results: dict) -> None:
    from samnnu.safe_io import write_json_atomic

    write_json_atomic(out / "distillation.json", results, indent=2)


def student_parts(student: Path, input_size: int):
    """The student's encoder with the teacher's prompt encoder and mask decoder, all from the student file."""
    from samnnu.pipeline.distill import build_parts
    from samnnu.plans.samnnu_planner import encoder_for_checkpoint

    name = encoder_for_checkpoint(student)
    return name, build_parts(name, input_size, checkpoint=student)


def teacher_parts(input_size: int):
    from samnnu.pipeline.distill import build_parts

    return build_parts("litemedsam", input_size)


def measure_speed(student: Path, input_size: int, batch: int, repeats: int) -> dict:
    import torch

    out = {"input_size": input_size, "batch": batch, "threads": torch.get_num_threads()}
    encoders = {"litemedsam": teacher_parts(input_size).image_encoder}
    name, parts = student_parts(student, input_size)
    encoders[name] = parts.image_encoder
    x = torch.rand(batch, 3, input_size, input_size)
    for label, enc in encoders.items():
        enc.eval()
        with torch.inference_mode():
            enc(x)  # warm-up
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                enc(x)
                times.append((time.perf_counter() - start) / batch)
        out[label] = {"seconds_per_image": statistics.median(times), "repeats": repeats}
    out["speedup"] = out["litemedsam"]["seconds_per_image"] / out[name]["seconds_per_image"]
    return out


def box_dice(student: Path, dataset: str, input_size: int, max_cases: int | None = None) -> dict:
    """Mean Dice of box-prompted masks, per encoder and class, over fold 0's validation slices."""
    import numpy as np
    import SimpleITK as sitk

    from samnnu.config import current_paths
    from samnnu.evaluation.metrics import dice
    from samnnu.interactive.refiner import SliceRefiner
    from samnnu.safe_io import read_json

    pre = current_paths().preprocessed / dataset
    raw = current_paths().raw / dataset
    labels = {k: v for k, v in read_json(raw / "dataset.json", "dataset.json")["labels"].items()
              if k not in ("background", "ignore")}
    cases = sorted(read_json(pre / "splits_final.json", "splits")[0]["val"])[:max_cases]
    name, sparts = student_parts(student, input_size)
    refiners = {"litemedsam": SliceRefiner(teacher_parts(input_size), encoder="litemedsam"),
                name: SliceRefiner(sparts, encoder=name)}
    scores = {enc: {c: [] for c in labels} for enc in refiners}
    for case in cases:
        image = sitk.GetArrayFromImage(sitk.ReadImage(str(raw / "imagesTr" / f"{case}_0000.nii.gz")))
        ref = sitk.GetArrayFromImage(sitk.ReadImage(str(raw / "labelsTr" / f"{case}.nii.gz")))
        for refiner in refiners.values():
            refiner.set_volume(image)
        for z in range(ref.shape[0]):
            for cname, value in labels.items():
                mask = ref[z] == value
                if not mask.any():
                    continue
                ys, xs = np.nonzero(mask)
                box = (int(ys.min()), int(xs.min()), int(ys.max()), int(xs.max()))
                for enc, refiner in refiners.items():
                    pred = refiner.decode(z, box=box, multimask="never").full > 0
                    scores[enc][cname].append(dice(pred, mask))
    out = {"cases": len(cases), "input_size": input_size,
           "slices_per_class": {c: len(v) for c, v in scores["litemedsam"].items()}}
    for enc, per in scores.items():
        out[enc] = {c: float(np.mean(v)) for c, v in per.items()}
        out[enc]["mean"] = float(np.mean(list(out[enc].values())))
    return out


def samunet(student: Path, data_root: Path, dataset: str, iterations: int, work: Path,
            equal_batch: bool = False) -> dict:
    """SAMUNetTrainer on fold 0 for ``iterations`` iterations with the teacher, then with the student (at the
    teacher's batch size with ``equal_batch``)."""
    from samnnu.config import setup_environment
    from samnnu.pipeline.planning import plan_and_preprocess
    from samnnu.pipeline.training import train
    from samnnu.safe_io import read_json, write_json_atomic

    per_epoch = min(50, iterations)
    epochs = max(1, iterations // per_epoch)
    out = {"iterations": epochs * per_epoch, "trainer": "SAMUNetTrainer", "fold": 0}
    setup_environment(data_root, quiet=True)
    start = time.time()
    result = train(dataset, 0, trainer="SAMUNetTrainer", configuration="2d", epochs=epochs,
                   iters_per_epoch=per_epoch, mirroring=False, device="cpu")
    out["litemedsam"] = {"dice": result["dice"], "seconds": round(time.time() - start)}
    # the same raw data, planned again with the student in a second data root, with the same folds
    root = work / "student_root"
    (root / "nnUNet_raw").mkdir(parents=True, exist_ok=True)
    link = root / "nnUNet_raw" / dataset
    if not link.exists():
        link.symlink_to(data_root / "nnUNet_raw" / dataset)
    setup_environment(root, quiet=True)
    pre = root / "nnUNet_preprocessed" / dataset
    if not (pre / "samnnuPlans.json").is_file():
        plan_and_preprocess(dataset, configurations=("2d",), sam_checkpoint=str(student), device_type="cpu")
    shutil.copyfile(data_root / "nnUNet_preprocessed" / dataset / "splits_final.json", pre / "splits_final.json")
    plans = read_json(pre / "samnnuPlans.json", "plans")
    sam = plans["configurations"]["2d"]["sam"]
    encoder, teacher_sam = sam["encoder"], read_json(data_root / "nnUNet_preprocessed" / dataset / "samnnuPlans.json",
                                                     "plans")["configurations"]["2d"]["sam"]
    out["batch_size"] = {"litemedsam": teacher_sam["batch_size"], "student_planned": sam.get("planned_batch_size",
                                                                                             sam["batch_size"])}
    if equal_batch and sam["batch_size"] != teacher_sam["batch_size"]:
        sam["planned_batch_size"] = out["batch_size"]["student_planned"]
        sam["batch_size"] = teacher_sam["batch_size"]
        write_json_atomic(pre / "samnnuPlans.json", plans, indent=2)
    out["batch_size"][encoder] = sam["batch_size"]
    start = time.time()
    result = train(dataset, 0, trainer="SAMUNetTrainer", configuration="2d", epochs=epochs,
                   iters_per_epoch=per_epoch, mirroring=False, device="cpu")
    out[encoder] = {"dice": result["dice"], "seconds": round(time.time() - start)}
    for key in ("litemedsam", encoder):
        out[key]["mean"] = sum(out[key]["dice"].values()) / len(out[key]["dice"])
    out["difference_points"] = 100 * (out[encoder]["mean"] - out["litemedsam"]["mean"])
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", required=True, type=Path)
    p.add_argument("-d", "--dataset", default="4")
    p.add_argument("--student", required=True, type=Path)
    p.add_argument("-o", "--output", required=True, type=Path)
    p.add_argument("--iterations", type=int, default=250)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--equal-batch", action="store_true",
                   help="samunet step: train the student at the teacher's batch size instead of its planned one")
    p.add_argument("--max-cases", type=int, default=None, help="box Dice on the first N validation cases only")
    p.add_argument("--steps", nargs="+", default=["speed", "box_dice", "samunet"],
                   choices=["speed", "box_dice", "samunet"])
    args = p.parse_args(argv)
    from samnnu.config import configure_threads, setup_environment
    from samnnu.datasets import dataset_name
    from samnnu.quiet import add_warning_filters
    from samnnu.safe_io import read_json

    add_warning_filters()
    setup_environment(args.data_root, quiet=True)
    configure_threads()
    dataset = dataset_name(args.dataset)
    args.output.mkdir(parents=True, exist_ok=True)
    results_file = args.output / "distillation.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    plans = read_json(args.data_root.resolve() / "nnUNet_preprocessed" / dataset / "samnnuPlans.json", "plans")
    sam = plans["configurations"]["2d"]["sam"]
    record = json.loads(__import__("torch").load(args.student, weights_only=True)["samnnu_distill"])
    results["student"] = {"file": str(args.student), "record": record}
    results["command"] = "python benchmarks/distillation.py " + " ".join(argv or sys.argv[1:])
    results["threads"] = os.environ.get("SAMNNU_NUM_THREADS", "all available")
    for step in args.steps:
        if step in results:
            print(f"{step}: done before, kept")
            continue
        if step == "speed":
            results[step] = measure_speed(args.student, sam["input_size"], sam["batch_size"], args.repeats)
        elif step == "box_dice":
            results[step] = box_dice(args.student, dataset, record["input_size"], args.max_cases)
        else:
            results[step] = samunet(args.student.resolve(), args.data_root.resolve(), dataset, args.iterations,
                                    args.output.resolve(), equal_batch=args.equal_batch)
        results[step]["command"] = results["command"]  # the top-level one is the latest invocation's
        _save(args.output, results)
        print(step, json.dumps(results[step]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

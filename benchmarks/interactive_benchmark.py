"""Simulated-user benchmark of interactive refinement (samnnu.interactive.refiner) on held-out cases.

Full measurement (every validation case of fold 0 of the hippocampus model trained with
SAMedLoRATrainer, 2d; results.json + results.md in the output folder; one thread, so it can share a
machine):

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python benchmarks/interactive_benchmark.py \\
        --data-root /work/bench_data -d 4 -f 0 -o /work/bench_out/interactive/full

Trial on a few cases: add ``--max-cases 3``. ``--embedding-cache DIR`` keeps the refiner's slice
embeddings (the expensive part) and the prompt-free predictions between runs. ``--variant
NAME:OPT=VAL,OPT=VAL`` compares :class:`samnnu.interactive.refiner.RefineOptions` settings on the same cases and
clicks (default: one variant, "default", the library's defaults); the comparison in docs/interactive.md:

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python benchmarks/interactive_benchmark.py \\
        --data-root /work/bench_data -d 4 -f 0 -o /work/bench_out/interactive/variants \\
        --embedding-cache /work/bench_out/interactive/cache --prompt-probe \\
        --variant default: --variant click_box:click_prompts=box --variant propagate:propagate_clicks=true \\
        --variant replace:clicks=replace

``--prompt-probe`` adds what the refiner does with prompts made from the reference itself (single click
vs box vs box + click, and the 3D Dice with a perfect box on every slice).

Protocol. For each validation case (its image and reference from nnUNet_raw, never seen in training of
that fold) the trained model predicts the case without prompts (with probabilities). Then, for each
foreground label separately and for each starting point
  - "prompt-free": the prompt-free label map, no prompts;
  - "auto": the automatic first prompts of that label (samnnu.interactive.auto_prompts) applied by the refiner;
  - "box": one box around the reference on the label's largest slice, propagated, no prompt-free prediction;
  - "box+prediction": the same box applied on top of the prompt-free prediction;
a simulated user adds up to ``--clicks`` interactions, one at a time: the largest connected error region of
the current mask (false negative or false positive, face connectivity) gets a click at its voxel deepest
inside it, or (``--users scribbles``) a scribble along the middle of the region on the slice where it is
largest; positive on a false negative, negative on a false positive (samnnu.interactive.simulated_user). The
reference is used only to choose the interaction and to score; the mask is computed from the image, the
prompt-free prediction and the interactions. Dice after 0, 1, 3 and 5 interactions is averaged over cases and
labels. Clicks against scribbles on the same cases:

    OMP_NUM_THREADS=1 python benchmarks/interactive_benchmark.py --data-root /work/bench_data -d 4 -f 0 \
        -tr SAMUNetTrainer --max-cases 12 --starts prompt-free --users clicks scribbles -o OUT
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import numpy as np


def parse_variant(text: str):
    from samnnu.interactive.refiner import RefineOptions

    name, _, opts = text.partition(":")
    return name, RefineOptions.parse([o for o in opts.split(",") if o])


def run_label(refiner, image, seg, probs, ref, label, labels, spacing, options, start, clicks, user="clicks",
              timing=None):
    """One label of one case from one starting point: Dice after 0..clicks interactions of the simulated
    ``user`` ("clicks" or "scribbles"), the interactions made (a click: z, y, x, sign; a scribble: its first
    voxel, sign and length) and each one's (seconds, decoder runs). ``timing``: a dict that gets the seconds
    the starting box took to answer (``box_seconds``), for the box starts."""
    from samnnu.evaluation.metrics import dice
    from samnnu.interactive.auto_prompts import auto_prompts
    from samnnu.interactive.refiner import InteractiveSession
    from samnnu.interactive.simulated_user import next_click, next_scribble

    target = ref == label
    if start == "box":  # one box on the label's largest slice, nothing from the prompt-free model
        seg, probs = np.zeros_like(seg), None
        options = dataclasses.replace(options, stop_at_base=False)
    session = InteractiveSession(refiner, image, seg, probs, labels, spacing=spacing, options=options)
    if start == "auto":
        for prompt in auto_prompts(seg, [label], probs, spacing=spacing):
            session.add_prompt(prompt)
    elif start in ("box", "box+prediction") and target.any():
        from samnnu.interactive.auto_prompts import bounding_rectangle

        z = int(np.argmax(target.sum(axis=(1, 2))))
        y0, x0, y1, x1 = bounding_rectangle(target[z])
        began = time.perf_counter()
        session.box(label, (z, y0, x0), (z, y1, x1))
        if timing is not None:
            timing["box_seconds"] = time.perf_counter() - began
    dices = [dice(session.label_mask(label), target)]
    made, steps = [], []
    for _ in range(clicks):
        if user == "scribbles":
            act = next_scribble(session.label_mask(label), target)
        else:
            act = next_click(session.label_mask(label), target, spacing)
        if act is not None:  # a perfect mask gets no more interactions; its Dice stays
            decodes, began = refiner.stats["decodes"], time.perf_counter()
            if user == "scribbles":
                session.scribble(label, act.voxels, act.positive)
                made.append([*act.voxels[0], "+" if act.positive else "-", len(act.voxels)])
            else:
                session.click(label, act.index, act.positive)
                made.append([*act.index, "+" if act.positive else "-"])
            steps.append([time.perf_counter() - began, refiner.stats["decodes"] - decodes])
        dices.append(dice(session.label_mask(label), target))
    return dices, made, steps


def prompt_probe(refiner, ref, labels, base=None):
    """How the refiner answers prompts made from the reference itself (an upper bound, not a user model).

    Per slice holding at least 20 reference voxels of a label: Dice of the refiner's mask with a single
    positive click at the slice's deepest reference voxel, the tight reference box, the box plus that click,
    the box plus a negative click at the deepest background voxel of the box grown by 4, and that grown box.
    Per label and case: 3D Dice when every reference slice gets the tight box (the refiner's ceiling with
    perfect boxes) and, with ``base`` (probabilities (C, Z, Y, X)), the same fused 50/50 with them.
    """
    from samnnu.evaluation.metrics import dice
    from samnnu.interactive.auto_prompts import bounding_rectangle, deepest_voxel
    from samnnu.interactive.prompts import Point
    from samnnu.interactive.refiner import enlarge, sigmoid

    slices, volumes = [], []
    for label in sorted(labels.values()):
        target = ref == label
        oracle = np.zeros_like(target)
        fused = np.zeros_like(target)
        for z in range(target.shape[0]):
            if not target[z].any():
                continue
            rect = bounding_rectangle(target[z])
            out = refiner.decode(z, box=rect)
            oracle[z] = out.full > 0
            if base is not None:
                fused[z] = 0.5 * sigmoid(out.full) + 0.5 * base[label][z] > 0.5
            if target[z].sum() < 20:
                continue
            y, x = deepest_voxel(target[z])
            pos = Point((z, y, x), True)
            grown = enlarge(rect, 4, target.shape[1:])
            background = np.zeros_like(target[z])
            background[grown[0]:grown[2] + 1, grown[1]:grown[3] + 1] = True
            background &= ~target[z]
            ny, nx = deepest_voxel(background) if background.any() else (0, 0)  # no room around it
            neg = Point((z, ny, nx), False)
            row = {"label": label, "z": z}
            for name, kw in (("click", dict(points=[pos])), ("box", dict(box=rect)),
                             ("box+click", dict(box=rect, points=[pos])),
                             ("box+negative", dict(box=rect, points=[neg])),
                             ("grown box", dict(box=grown))):
                m = refiner.decode(z, **kw).full > 0
                row[name] = dice(m, target[z])
                row[name + " holds click"] = bool(m[y, x])
            slices.append(row)
        volumes.append({"label": label, "oracle_box_dice": dice(oracle, target),
                        "oracle_box_fused_dice": dice(fused, target) if base is not None else None})
    return {"slices": slices, "volumes": volumes}


def probe_summary(probes: list[dict]) -> dict:
    rows = [r for p in probes for r in p["slices"]]
    names = ("click", "box", "box+click", "box+negative", "grown box")
    out = {"n_slices": len(rows)}
    for name in names:
        out[name] = float(np.mean([r[name] for r in rows])) if rows else None
        out[name + " holds click"] = float(np.mean([r[name + " holds click"] for r in rows])) if rows else None
    vols = [v for p in probes for v in p["volumes"]]
    out["oracle_box_dice"] = float(np.mean([v["oracle_box_dice"] for v in vols])) if vols else None
    fused = [v["oracle_box_fused_dice"] for v in vols if v["oracle_box_fused_dice"] is not None]
    out["oracle_box_fused_dice"] = float(np.mean(fused)) if fused else None
    return out


def click_step_timing(records) -> dict:
    """How long one click took to answer (embeddings cached or not), per click and per slice it decoded."""
    steps = [s for r in records for s in r.get("click_steps", [])]
    per_slice = [t / n for t, n in steps if n > 0]
    return {"click_steps": len(steps),
            "click_step_seconds_median": float(np.median([t for t, _ in steps])) if steps else None,
            "click_step_seconds_max": float(np.max([t for t, _ in steps])) if steps else None,
            "click_step_seconds_per_decoded_slice_max": float(np.max(per_slice)) if per_slice else None,
            "click_step_seconds_per_decoded_slice_median": float(np.median(per_slice)) if per_slice else None,
            **box_timing(records)}


def box_timing(records) -> dict:
    """How long the starting boxes took to answer (decoded and propagated, or answered by the corrector)."""
    seconds = [r["box_seconds"] for r in records if "box_seconds" in r]
    return {"boxes": len(seconds), "box_seconds_median": float(np.median(seconds)) if seconds else None,
            "box_seconds_max": float(np.max(seconds)) if seconds else None}


def summarize(records, clicks_at=(0, 1, 3, 5)):
    """Mean Dice over cases and labels per (variant, start, user) at each number of interactions, plus per
    label."""
    out = {}
    for r in records:
        key = f"{r['variant']}|{r['start']}|{r.get('user', 'clicks')}"
        out.setdefault(key, {"all": [], "by_label": {}})
        out[key]["all"].append(r["dice"])
        out[key]["by_label"].setdefault(r["label"], []).append(r["dice"])
    table = {}
    for key, v in out.items():
        variant, start, user = key.split("|")
        row = {"variant": variant, "start": start, "user": user, "n": len(v["all"])}
        arr = np.asarray(v["all"])
        for k in clicks_at:
            if k < arr.shape[1]:
                row[f"dice_{k}"] = float(arr[:, k].mean())
        row["by_label"] = {name: {f"dice_{k}": float(np.asarray(d)[:, k].mean()) for k in clicks_at
                                  if k < len(d[0])} for name, d in v["by_label"].items()}
        table[key] = row
    return list(table.values())


def markdown(result) -> str:
    ks = [k for k in (0, 1, 3, 5) if k <= result["settings"]["clicks"]]
    lines = ["# Interactive refinement: simulated user", "",
             f"Command: `{result['command']}`", "",
             f"Model: {result['settings']['model']}, fold {result['settings']['fold']}; "
             f"{result['settings']['refiner_description']}; {len(result['cases'])} validation cases: "
             f"{', '.join(result['cases'])}.", "",
             "Mean Dice over cases and labels after k interactions (one label at a time; a click at the deepest "
             "voxel of the largest error region, or a scribble along its middle on its largest slice). Start \"prompt-free\" = the trained model's prediction; \"auto\" = its automatic first "
             "prompts applied by the refiner; \"box\" = one reference box per label on its largest slice, "
             "propagated through the volume, without the prompt-free prediction; \"box+prediction\" = the same box "
             "applied on top of the prompt-free prediction (propagation stops where the prediction has no voxel "
             "of the label; the other slices keep the prediction).", "",
             "| variant | start | user | n | " + " | ".join(f"{k}" for k in ks) + " |",
             "|---|---|---|---|" + "---|" * len(ks)]
    for row in result["summary"]:
        lines.append(f"| {row['variant']} | {row['start']} | {row['user']} | {row['n']} | "
                     + " | ".join(f"{row[f'dice_{k}']:.4f}" for k in ks) + " |")
    lines += ["", "Per label:", "", "| variant | start | user | label | " + " | ".join(f"{k}" for k in ks) + " |",
              "|---|---|---|---|" + "---|" * len(ks)]
    for row in result["summary"]:
        for name, d in row["by_label"].items():
            lines.append(f"| {row['variant']} | {row['start']} | {row['user']} | {name} | "
                         + " | ".join(f"{d[f'dice_{k}']:.4f}" for k in ks) + " |")
    lines += ["", "Variants (samnnu.interactive.refiner.RefineOptions):", ""]
    for name, opts in result["settings"]["variants"].items():
        lines.append(f"- {name}: " + ", ".join(f"{k}={v}" for k, v in opts.items()))
    if result.get("prompt_probe"):
        pr = result["prompt_probe"]
        lines += ["", "Prompt probe (prompts made from the reference; what the refiner can do with them), mean slice "
                      f"Dice over {pr['n_slices']} slices with >= 20 reference voxels (share of masks holding the "
                      "click voxel):", "", "| prompt | slice Dice | holds click |", "|---|---|---|"]
        for name in ("click", "box", "box+click", "box+negative", "grown box"):
            lines.append(f"| {name} | {pr[name]:.3f} | {pr[name + ' holds click']:.2f} |")
        lines += ["", f"Tight reference box on every slice, 3D Dice: refiner alone {pr['oracle_box_dice']:.4f}, fused "
                      f"50/50 with the prompt-free probabilities {pr['oracle_box_fused_dice']:.4f}."]
    t = result["timing"]
    lines += ["", f"Refiner cost on this machine ({t['torch_threads']} torch thread(s)): {t['embeddings']} slice "
                  f"embeddings computed, {t['embedding_seconds_per_slice']:.2f} s each ({t['embeddings_from_cache']} "
                  f"loaded from the cache); {t['decodes']} decoder runs, "
                  f"{t['decode_seconds_per_run']:.3f} s each. "
                  + (f"An interaction was answered in {t['click_step_seconds_median']:.2f} s (median; at most "
                     f"{t['click_step_seconds_max']:.2f} s" + (
                         f"; at most {t['click_step_seconds_per_decoded_slice_max']:.2f} s per slice it decoded, "
                         f"embeddings included when not yet computed" if t.get("click_step_seconds_per_decoded_slice_max")
                         is not None else "; no slice decoded") + "). " if t["click_steps"] else "")
                  + (f"A starting box was answered in {t['box_seconds_median']:.2f} s (median; at most "
                     f"{t['box_seconds_max']:.2f} s). " if t.get("boxes") else "")
                  + (f"The 3D click corrector ran {t['corrector_runs']} times, {t['corrector_seconds_per_run']:.3f} s "
                     f"each. " if "corrector_runs" in t else "")
                  + "Prompt-free prediction: "
                  f"{t['prompt_free_seconds']:.1f} s for all cases. Total {t['total_seconds']:.0f} s.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", required=True, help="folder with nnUNet_raw, nnUNet_preprocessed, nnUNet_results "
                                                      "(only read)")
    p.add_argument("-d", "--dataset", default="4")
    p.add_argument("-f", "--fold", type=int, default=0)
    p.add_argument("-tr", "--trainer", default="SAMedLoRATrainer")
    p.add_argument("-c", "--configuration", default="2d")
    p.add_argument("-p", "--plans", default=None)
    p.add_argument("--cases", nargs="+", default=None, help="validation cases to use (default: all of the fold)")
    p.add_argument("--max-cases", type=int, default=None, help="only the first N validation cases")
    p.add_argument("--clicks", type=int, default=5, help="interactions per label and start (clicks or scribbles)")
    p.add_argument("--users", nargs="+", default=["clicks"], choices=["clicks", "scribbles"],
                   help="simulated users to compare on the same cases: a click at the deepest voxel of the largest "
                        "error region, or a scribble along its middle on its largest slice")
    p.add_argument("--starts", nargs="+", default=["prompt-free", "auto"], choices=["prompt-free", "auto", "box", "box+prediction"],
                   help="prompt-free: the model's prediction; auto: its automatic first prompts; box: one reference "
                        "box per label on its largest slice, propagated, without the prompt-free prediction; "
                        "box+prediction: the same box on top of the prompt-free prediction, as samnnu_predict "
                        "--prompts applies it")
    p.add_argument("--refiner", default="litemedsam", help="refiner encoder (litemedsam; tiny for smoke tests)")
    p.add_argument("--refiner-weights", default="auto",
                   help="auto (the model's trained prompt path, fold_F/refiner.pth, and its 3D click corrector, "
                        "fold_F/click_corrector.pth, when it has them), pretrained (neither), or a refiner.pth file")
    p.add_argument("--variant", action="append", default=None,
                   help="NAME:OPT=VAL,OPT=VAL (RefineOptions); repeatable (default: default:)")
    p.add_argument("--prompt-probe", action="store_true",
                   help="also measure the refiner on prompts made from the reference (clicks vs boxes, the ceiling "
                        "with a perfect box on every slice)")
    p.add_argument("--embedding-cache", default=None,
                   help="folder keeping slice embeddings and prompt-free predictions between runs")
    p.add_argument("--device", default="cpu")
    p.add_argument("--disable-tta", action="store_true", help="prompt-free prediction without mirroring")
    p.add_argument("-o", "--output", required=True, help="output folder (results.json, results.md)")
    args = p.parse_args(argv)

    import torch

    from samnnu.config import setup_environment
    from samnnu.datasets import dataset_name, model_folder, model_folder_name
    from samnnu.defaults import PLANS_NAME
    from samnnu.interactive.prompts import label_values
    from samnnu.interactive.refiner import SliceRefiner
    from samnnu.pipeline.prediction import choose_corrector, choose_prompt_path, prompt_free_predictions, read_image
    from samnnu.safe_io import (
        check_torch_archive,
        load_torch_safely,
        read_json,
        to_jsonable,
        write_atomic,
        write_json_atomic,
        write_text_atomic,
    )

    out_dir = Path(args.output).resolve()
    data_root = Path(args.data_root).resolve()
    if data_root in out_dir.parents or out_dir == data_root:
        raise SystemExit(f"{out_dir}: write the results outside the data root {data_root}")
    if os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    total_start = time.perf_counter()
    paths = setup_environment(data_root, quiet=True)
    name = dataset_name(args.dataset)
    splits = read_json(paths.preprocessed / name / "splits_final.json", "splits_final.json")
    cases = list(args.cases or splits[args.fold]["val"])[: args.max_cases]
    raw = paths.raw / name
    ending = read_json(raw / "dataset.json", "dataset.json")["file_ending"]
    inputs = {c: [raw / "imagesTr" / f"{c}_0000{ending}"] for c in cases}

    start = time.perf_counter()
    cache = Path(args.embedding_cache) if args.embedding_cache else None
    tta = int(not args.disable_tta)
    plans = args.plans or PLANS_NAME
    tag = f"{args.trainer}_{plans}_{args.configuration}_f{args.fold}_tta{tta}"
    cached = {c: cache / f"{c}_{tag}.npz" for c in cases} if cache else {}
    if cache and all(f.is_file() for f in cached.values()):
        predictions = {c: (np.load(f)["seg"], np.load(f)["probs"]) for c, f in cached.items()}
        folder = model_folder(name, args.trainer, plans, args.configuration)
        dataset_json = read_json(folder / "dataset.json", "dataset.json of the model")
    else:
        predictions, dataset_json = prompt_free_predictions(inputs, name, folds=(args.fold,), trainer=args.trainer,
                                                            configuration=args.configuration, plans=args.plans,
                                                            device=args.device, mirroring=not args.disable_tta)
        for c, f in cached.items():
            seg, probs = predictions[c]
            write_atomic(f, lambda tmp: np.savez_compressed(tmp, seg=seg, probs=probs))
    prompt_free_seconds = time.perf_counter() - start
    labels = label_values(dataset_json["labels"])
    names = {v: k for k, v in labels.items()}
    variants = dict(parse_variant(v) for v in (args.variant or ["default:"]))

    folder = model_folder(name, args.trainer, plans, args.configuration)
    refiner = SliceRefiner.create(args.refiner, device=args.device,
                                  trained=choose_prompt_path(folder, (args.fold,), args.refiner_weights),
                                  corrector=choose_corrector(folder, (args.fold,), args.refiner_weights))
    print(f"refiner: {refiner.description}", flush=True)
    records, probes = [], []
    from_cache = 0
    for case in cases:
        image, geometry = read_image(inputs[case][0])
        ref, _ = read_image(raw / "labelsTr" / f"{case}{ending}")
        ref = ref.astype(np.int64)
        seg, probs = predictions[case]
        spacing = tuple(reversed(geometry.spacing))
        refiner.set_volume(image)
        cache_file = cache / f"{case}_{args.refiner}.pt" if cache else None
        if cache_file is not None and cache_file.is_file():
            saved = load_torch_safely(cache_file, map_location=refiner.device)
            refiner.embeddings.update(saved)
            from_cache += len(saved)
        for vname, options in variants.items():
            for start_name in args.starts:
                for user in args.users:
                    for label in sorted(names):
                        took = {}
                        dices, made, steps = run_label(refiner, image, seg, probs, ref, label, labels, spacing,
                                                       options, start_name, args.clicks, user, took)
                        records.append({"case": case, "label": names[label], "variant": vname, "start": start_name,
                                        "user": user, "dice": dices, "clicks": made, "click_steps": steps, **took})
                        print(f"{case} {names[label]:>10} {vname:>12} {start_name:>11} {user:>9}: "
                              + " ".join(f"{d:.3f}" for d in dices), flush=True)
        if args.prompt_probe:
            probes.append(prompt_probe(refiner, ref, labels, probs))
        if cache_file is not None:
            embeddings = dict(refiner.embeddings)
            write_atomic(cache_file, lambda tmp: torch.save(embeddings, tmp), check_torch_archive)

    st = refiner.stats
    result = {
        "command": " ".join(["python benchmarks/interactive_benchmark.py", *(argv or sys.argv[1:])]),
        "settings": {"model": model_folder_name(args.trainer, plans, args.configuration),
                     "dataset": name, "fold": args.fold, "clicks": args.clicks, "users": args.users,
                     "refiner": args.refiner,
                     "refiner_description": refiner.description, "prompt_path": refiner.trained,
                     "tta": not args.disable_tta,
                     "variants": {k: dataclasses.asdict(v) for k, v in variants.items()}},
        "cases": cases,
        "summary": summarize(records),
        "prompt_probe": probe_summary(probes) if probes else None,
        "records": records,
        "timing": {"embeddings": st["embeddings"], "embeddings_from_cache": from_cache,
                   "embedding_seconds_per_slice": st["embedding_seconds"] / max(1, st["embeddings"]),
                   "decodes": st["decodes"], "decode_seconds_per_run": st["decode_seconds"] / max(1, st["decodes"]),
                   **click_step_timing(records),
                   **({"corrector_runs": refiner.corrector.stats["runs"],
                       "corrector_seconds_per_run": refiner.corrector.stats["seconds"]
                       / max(1, refiner.corrector.stats["runs"])} if refiner.corrector is not None else {}),
                   "prompt_free_seconds": prompt_free_seconds,
                   "total_seconds": time.perf_counter() - total_start, "torch_threads": torch.get_num_threads()},
    }
    write_json_atomic(out_dir / "results.json", to_jsonable(result), indent=1)
    write_text_atomic(out_dir / "results.md", markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

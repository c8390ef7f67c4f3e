"""samnnu's defaults that several modules share (names written into plans, folders and checkpoints)."""
from __future__ import annotations

#: the plans samnnu's planner writes (nnU-Net's own are ``nnUNetPlans``)
PLANS_NAME = "samnnuPlans"
#: the trainer used when the user names none, by the configuration's patch dimension; the 2D one was chosen
#: by 2-fold cross-validation at an equal time budget (docs/benchmarks.md, "Choosing samnnu's default")
DEFAULT_TRAINERS = {2: "SAMUNetTrainer", 3: "SAM3DAdapterTrainer"}
DEFAULT_CONFIGURATION = "2d"
DEFAULT_TRAINER = DEFAULT_TRAINERS[2]
#: the settings of a training run, written into its fold folder (used by --continue and the report)
RUN_SETTINGS = "samnnu_training.json"
#: a fold's checkpoints, newest first: the order in which they are tried when resuming or predicting
CHECKPOINTS_NEWEST_FIRST = ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")
#: a prompt path trained on a fold's cases (samnnu_train_prompts): its file in the fold folder, and the key of
#: its record inside that file
PROMPT_PATH_FILE = "refiner.pth"
PROMPT_PATH_RECORD = "samnnu_prompt_path"
#: the checkpoint a finished training leaves, the one prediction uses unless told otherwise
FINAL_CHECKPOINT = CHECKPOINTS_NEWEST_FIRST[0]
#: a 3D click corrector trained on a fold's cases (samnnu_train_prompts --corrector): its file in the fold
#: folder, and the key of its record inside that file
CLICK_CORRECTOR_FILE = "click_corrector.pth"
CLICK_CORRECTOR_RECORD = "samnnu_click_corrector"

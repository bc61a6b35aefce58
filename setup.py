"""diffattn: fused differential attention (Differential Transformer, DiffCLIP) for PyTorch.

Layout: ``diffattn/`` is the public API, ``kernels/`` the Triton kernels and ``models/`` the
CLIP encoders. ``kernels/`` and ``models/`` install as ``diffattn.kernels`` and
``diffattn.models`` (``package_dir``); there are no top-level ``kernels``/``models`` packages.
"""
from setuptools import setup

setup(
    name="diffattn",
    version="0.1.0",
    description="Differential attention at FlashAttention speed: fused Triton kernels, "
    "DiffMultiheadAttention and DiffCLIP models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    packages=["diffattn", "diffattn.training", "diffattn.integrations", "diffattn.kernels",
              "diffattn.models"],
    package_dir={
        "diffattn": "diffattn",
        "diffattn.kernels": "kernels",
        "diffattn.models": "models",
    },
    package_data={"diffattn.models": ["configs/*.json", "*.txt.gz", "*.txt"]},
    include_package_data=False,
    install_requires=[
        "torch>=2.6",
        "triton>=3.2; platform_system == 'Linux'",
        "numpy",
        "einops",
    ],
    extras_require={
        "models": ["ftfy", "regex", "pillow", "safetensors"],
        "train": ["ftfy", "regex", "pillow", "safetensors", "scikit-learn", "webdataset", "tqdm",
                  "matplotlib"],
        "bench": ["matplotlib", "tqdm"],
        # diffattn.integrations.timm; 1.0.31 is the timm its tests were run against.
        "timm": ["timm>=1.0.31"],
        "test": [
            "pytest",
            "ftfy",
            "regex",
            "pillow",
            "safetensors",
            "scikit-learn",
            "webdataset",
            "tqdm",
            "matplotlib",
        ],
    },
    entry_points={"console_scripts": ["diffattn-train=diffattn.train:main"]},
)

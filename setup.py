"""fastclr: SimCLRv2 in PyTorch, built around data-loading throughput.

Two packages are installed: ``fastclr`` (models, losses, optimizer, entry points) and ``loaders``
(augment recipes and the torch / DALI / FFCV data backends). ``loaders`` never imports ``fastclr``.
"""
import re
from pathlib import Path

from setuptools import find_packages, setup

VERSION = re.search(r'__version__ = "([^"]+)"', Path(__file__).with_name("fastclr").joinpath("__init__.py").read_text()).group(1)

extras = {
    # DALI wheels are per CUDA major version: cuda130 needs a driver for CUDA 13 (>= 580).
    # For older drivers install nvidia-dali-cuda120 instead (see README, "Installing DALI").
    "dali": ["nvidia-dali-cuda130"],
    # ffcv builds from source against libturbojpeg + opencv (apt: libturbojpeg0-dev libopencv-dev
    # pkg-config). The GPU scripts build it offline with --no-deps, so its requirements are listed
    # here, the one list they read (benchmarks/gpu/deps.py). Imported at run time: numba, OpenCV,
    # setuptools (ffcv imports distutils, which Python >= 3.12 has only through setuptools) and
    # pytorch_pfn_extras (NormalizeImage on CUDA). Declared by ffcv but not imported by its loader:
    # terminaltables, fastargs, assertpy, psutil (kept so that `pip check` passes).
    "ffcv": ["ffcv==1.0.2", "numba", "opencv-python-headless", "setuptools", "pytorch_pfn_extras",
             "terminaltables", "fastargs", "assertpy", "psutil"],
    "dev": ["pytest>=8", "hypothesis", "ruff"],
    # python -m loaders.demo_data --dataset digits: the second small data set of the few-label experiments
    # (docs/semisup.md), shipped inside scikit-learn.
    "data": ["scikit-learn"],
    # Peers, used only by benchmarks/throughput.py as a same-run baseline.
    "peers": ["lightly"],
    # python -m fastclr.zoo convert: TensorFlow's own reader for the released TF1 checkpoints (training never
    # imports TensorFlow). The CPU build where it exists; the full package elsewhere reads the same files.
    "tf": ["tensorflow-cpu; platform_system == 'Linux' and platform_machine == 'x86_64'",
           "tensorflow; platform_system != 'Linux' or platform_machine != 'x86_64'"],
    # Charts: benchmarks/report.py, python -m fastclr.plot, python -m loaders.preview.
    "plot": ["matplotlib"],
    # --run.tensorboard=true: the run log's scalars as TensorBoard event files.
    "tensorboard": ["tensorboard"],
}

setup(
    name="fastclr",
    version=VERSION,
    description="SimCLRv2 (pretrain, fine-tune, distill) in PyTorch with GPU-side data loading",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["fastclr", "fastclr.*", "loaders", "loaders.*"]),
    install_requires=["torch", "torchvision", "numpy", "pillow", "tqdm"],
    extras_require=extras,
    entry_points={
        "console_scripts": [
            "fastclr-pretrain=fastclr.pretrain:main",
            "fastclr-finetune=fastclr.finetune:main",
            "fastclr-distill=fastclr.distill:main",
            "fastclr-linear-eval=fastclr.linear_eval:main",
            "fastclr-export=fastclr.export:main",
            "fastclr-launch=fastclr.launch:main",
            "fastclr-zoo=fastclr.zoo.cli:main",
            "fastclr-write-ffcv=loaders.write_ffcv:main",
            "fastclr-validate=loaders.validate:main",
        ]
    },
)

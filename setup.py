import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    """A module built by CMakeLists.txt (the C++ sources live in csrc)."""

    def __init__(self, name: str, target: str):
        super().__init__(name, sources=[])
        self.target = target


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_dir = Path(self.build_temp).resolve() / ext.target
        build_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cmake", str(ROOT), f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
                        f"-DPython_EXECUTABLE={sys.executable}",
                        f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
                        "-DCMAKE_BUILD_TYPE=Release"], cwd=build_dir, check=True)
        subprocess.run(["cmake", "--build", ".", "--target", ext.target, "-j",
                        str(os.cpu_count() or 1)], cwd=build_dir, check=True)


setup(
    name="mapo_fast",
    version="0.1.0",
    description="Fast fused losses, advantages, visual tools and rollouts for MAPO-style RL of "
                "vision-language agents",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    license="Apache-2.0",
    license_files=["LICENSE"],
    # one importable top-level name; the C++ sources in csrc build into mapo_fast.kernels
    packages=find_packages(include=["mapo_fast", "mapo_fast.*"]),
    ext_modules=[CMakeExtension("mapo_fast.kernels._block_manager", "_block_manager"),
                 CMakeExtension("mapo_fast.kernels._paged_attention_cpu",
                                "_paged_attention_cpu")],
    cmdclass={"build_ext": CMakeBuild},
    # the oldest torch and transformers here are the ones `make test-floor` runs the suite under
    install_requires=[
        "torch>=2.11",
        "triton>=3.0; platform_system == 'Linux'",
        "numpy",
    ],
    extras_require={
        "test": ["pytest>=8", "hypothesis>=6", "liger-kernel>=0.6", "pillow>=10",
                 "transformers>=5.9.0"],
        "bench": ["pytest-benchmark>=4", "liger-kernel>=0.6", "matplotlib>=3.7", "pillow>=10",
                  "transformers>=5.9.0", "psutil"],
        "train": ["transformers>=5.9.0", "tokenizers>=0.22", "pyyaml>=6", "tqdm>=4.60",
                  "matplotlib>=3.7", "pillow>=10", "pyarrow>=14"],
        # the framework releases the integrations are tested against (tests/integrations/)
        "trl": ["trl>=1.16.0,<1.17", "transformers>=5.9.0", "pillow>=10"],
        "verl": ["verl>=0.9.1,<0.10", "transformers>=5.9.0", "pillow>=10"],
        "dev": ["pytest>=8", "hypothesis>=6", "liger-kernel>=0.6", "pytest-benchmark>=4",
                "matplotlib>=3.7", "pillow>=10", "transformers>=5.9.0", "tokenizers>=0.22",
                "pyyaml>=6", "tqdm>=4.60", "psutil", "pyarrow>=14"],
    },
    entry_points={"console_scripts": ["mapo-bench=mapo_fast.cli:bench_main",
                                    "mapo-train=mapo_fast.cli:train_main",
                                    "mapo-eval=mapo_fast.cli:eval_main"]},
)

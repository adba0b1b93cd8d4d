from setuptools import find_packages, setup

setup(
    name="mapo_fast",
    version="0.1.0",
    description="Fast fused losses, advantages, visual tools and rollouts for MAPO-style RL of "
                "vision-language agents",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # `kernels/` ships inside the package as `mapo_fast.kernels`: no other top-level module.
    packages=find_packages(include=["mapo_fast", "mapo_fast.*"]) + ["mapo_fast.kernels"],
    package_dir={"mapo_fast.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "numpy",
    ],
    extras_require={
        "test": ["pytest>=8", "hypothesis>=6", "liger-kernel>=0.6", "pillow>=10",
                 "transformers>=4.45"],
        "bench": ["pytest-benchmark>=4", "liger-kernel>=0.6", "matplotlib>=3.7", "pillow>=10",
                  "transformers>=4.45"],
        "dev": ["pytest>=8", "hypothesis>=6", "liger-kernel>=0.6", "pytest-benchmark>=4",
                "matplotlib>=3.7", "pillow>=10", "transformers>=4.45"],
    },
    entry_points={"console_scripts": ["mapo-bench=mapo_fast.cli:bench_main"]},
)

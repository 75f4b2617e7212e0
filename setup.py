"""btfast: a fast, exact inference engine for BridgeTower models from `transformers`."""

from setuptools import find_packages, setup

setup(
    name="btfast",
    version="0.1.0",
    description="Fast, exact inference for Hugging Face BridgeTower models: Triton kernels, shape buckets, CUDA graphs",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["btfast", "btfast.*"]) + ["btfast.kernels"],
    # The kernels live in kernels/ but are installed as btfast.kernels: a top-level `kernels`
    # package exists on PyPI and transformers probes for it.
    package_dir={"btfast.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "transformers>=4.40",
        "triton>=3.0; platform_system == 'Linux'",
        "pillow>=10",
        "numpy",
        "tqdm",
        "pyarrow",  # Parquet is a main input and output format of btfast score / embed / retrieve
        "fsspec>=2023.1",  # inputs and outputs as URLs (s3://, gs://, memory://, file://); backends are extras
    ],
    extras_require={
        "test": [
            "pytest",
            "tokenizers",
            "ruff",
            "matplotlib",
            "ray[data]>=2.9",
            "fsspec>=2023.1",
            "s3fs",
            "moto[server]",
            "webdataset",
        ],
        "parquet": [],  # kept so that `pip install 'btfast[parquet]'` still works: pyarrow is in the base install
        "plot": ["matplotlib"],
        "ray": ["ray[data]>=2.9"],
        "s3": ["s3fs"],
    },
    entry_points={"console_scripts": ["btfast=btfast.cli:main"]},
)

from setuptools import find_packages, setup

setup(
    name="diffmoe_jax",
    version="0.1.0",
    description=(
        "JAX/Flax sparse language models: differential attention, mixture-of-experts "
        "and mixture-of-depths, with the PI model family and its training curriculum."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["diffmoe_jax", "diffmoe_jax.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "grain>=0.2.18",
        "ml_collections>=1.1.0",
        "tensorboard>=2.21.0",
        "absl-py>=2.1",
        "numpy>=1.26",
        "tqdm>=4.66",
        "matplotlib>=3.8",
    ],
    extras_require={
        "tokenizers": ["sentencepiece>=0.2", "tokenizers>=0.20"],
        # `bench gpu_compile` on a host without a GPU: JAX's CUDA plugin (of the installed jaxlib) and ptxas.
        "gpu-compile": ["jax[cuda12-local]", "nvidia-cuda-nvcc-cu12"],
        "test": ["pytest>=8", "pytest-xdist>=3.5", "sentencepiece>=0.2", "tokenizers>=0.20", "nbclient>=0.10", "nbformat>=5.10",
                 "ipykernel>=6.29"],
    },
)

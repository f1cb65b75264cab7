"""Package discovery for dft-ops; the metadata lives in pyproject.toml.

Every package under dft_ops/ is found, so a new subpackage cannot be left out of
the wheel. kernels/ sits at the top of the repository but is installed only as
dft_ops.kernels (with any subpackages): a top-level `kernels` module would shadow
Hugging Face's `kernels` package, which transformers probes for.
"""

from setuptools import find_packages, setup

KERNELS = ["dft_ops.kernels", *(f"dft_ops.kernels.{name}" for name in find_packages("kernels"))]

setup(
    packages=[*find_packages(include=["dft_ops", "dft_ops.*"]), *KERNELS],
    package_dir={"dft_ops.kernels": "kernels"},
)

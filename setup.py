"""bayesprompt: Bayesian and probabilistic adaptation of CLIP-style models in JAX."""

import pathlib

import setuptools

HERE = pathlib.Path(__file__).parent


def _requirements() -> list[str]:
  lines = (HERE / "requirements.txt").read_text().splitlines()
  runtime = []
  for line in lines:
    line = line.split("#")[0].strip()
    if not line:
      continue
    if line.split("==")[0] in {"pytest", "polyagamma", "ruff", "portpicker"}:
      continue  # test-only
    runtime.append(line)
  return runtime


setuptools.setup(
    name="bayesprompt",
    version="0.1.0",
    description="Bayesian prompt learning and Laplace approximations for CLIP-style models in JAX.",
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # Only the library ships: experiments/ (the binaries), benchmarks/ and tests/ are repository tools, run
    # from a checkout (`python -m experiments.<name>`); a wheel must not claim generic top-level names like
    # "experiments".
    packages=setuptools.find_packages(include=["bayesprompt", "bayesprompt.*"]),
    package_data={
        "bayesprompt": ["clip/assets/*", "data/assets/*", "assets/*", "assets/**/*"],
    },
    include_package_data=True,
    install_requires=_requirements(),
    extras_require={"bench": ["torch==2.13.0", "pytest-benchmark==5.2.3"]},
)

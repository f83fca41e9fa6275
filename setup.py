"""mmbert_jax: mmBERT-style multilingual encoder pretraining in JAX (model, kernels, data, training)."""

from setuptools import find_packages, setup

setup(
  name="mmbert_jax",
  version="0.1.0",
  description="Pretraining mmBERT-style multilingual encoders with JAX/Flax on TPU pods and GPU clusters.",
  python_requires=">=3.11",
  packages=find_packages(include=["mmbert_jax", "mmbert_jax.*", "data_pipeline", "data_pipeline.*", "configs"]),
  install_requires=[
    # Versions known to work together on Python 3.11 (CPU, TPU AOT, CUDA lowering).
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "array-record==0.8.6",
    "sentencepiece==0.2.3",
    "ml-collections==1.1.0",
    "tensorflow-datasets==4.9.10",
    "absl-py>=2.1",
    "numpy>=2.0",
    "pyarrow>=17",
    "tqdm>=4.66",
    "tensorboardX==2.6.5",
    "matplotlib>=3.8",  # python -m mmbert_jax.report
    "babel==2.18.0",  # CLDR locale data: the embedded multilingual demo corpus
    "safetensors>=0.4",
    # gs:// paths (data_pipeline/filesystem.py): epath's GCS backend, and tensorboardX's.
    "gcsfs>=2024.6",
    "google-cloud-storage>=2.14",
  ],
  extras_require={
    # torch pinned to the CPU build available here; other versions pull several GB of CUDA packages.
    "test": [
      "pytest>=8",
      "torch==2.13.0",
      "transformers==5.23.0",
      "tokenizers>=0.20",
      "sentence-transformers==6.2.0",
      "gcp-storage-emulator>=2024.1",  # the GCS JSON API on localhost (tests/conftest.py)
      "pytest-xdist>=3.6",  # -n 2: tests that wait on subprocesses overlap
      "ruff==0.17.6",  # the lint and format contract of pyproject.toml (.ci/run checks it first)
    ],
    # python -m data_pipeline.prepare_beam (Dataflow, Flink, Spark, the DirectRunner). Every Apache Beam release
    # caps protobuf below 7 and pyarrow below 26 (2.78: protobuf 6.33, pyarrow 25; older ones lower), so this
    # extra downgrades both against the environment above; tests/test_prepare_beam.py runs Beam in a venv of its own.
    "beam": ["apache-beam[gcp]==2.78.0"],
    # libtpu matching jax 0.10.2: runs on TPU VMs and compiles for TPU topologies on any machine.
    "tpu": ["jax[tpu]==0.10.2"],
  },
)

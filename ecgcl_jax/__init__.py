"""ecgcl-jax: contrastive pretraining of 12-lead ECG encoders in JAX/Flax."""

__version__ = "0.1.0"

LEADS = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
"""Standard 12-lead order used everywhere in the project (never alphabetical)."""

SAMPLE_RATE = 500  # Hz
NUM_SAMPLES = 5000  # 10 s at 500 Hz
# the leads of cmlc/cmsmlc: the default of config.clocs_leads (configs/base.py), and what an exported encoder
# that does not record its leads was pretrained with
DEFAULT_CLOCS_LEADS = ("II", "V2", "aVL", "aVR")


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    import os  # noqa: PLC0415 - the package namespace holds only the project's names

    return (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    )

"""The error of benchmark loading, shared by `benchmarks` (release files) and `hf_files` (Hugging Face copies)."""


class BenchmarkError(ValueError):
    """A benchmark file is missing or malformed; the message names the file and the record."""

"""The benchmark scripts (run as files: `python benchmarks/<name>.py`); a package only so that the tests
can import their shared inputs (benchmarks.prompts)."""
